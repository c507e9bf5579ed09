"""What a GPU is expected to do, for the benchmarks' projections: datasheet peaks and the target MFU.

Its own module so that every `bench_*` module can import these facts without
importing `bench`, which imports them all.
"""

import functools

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s: the MFU denominator.
DENSE_BF16_PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4,
                          "A100": 312.0, "L40S": 362.0}

TARGET_MFU = 0.45  # the share of the dense bf16 peak a tuned GPU step reaches: what the projections assume


@functools.cache
def gpu_samples_per_s(model: str = "m2d_as_vit_base", gpu: str = "H100 SXM") -> int:
    """The rate the loader must feed one GPU: TARGET_MFU of its datasheet peak over the model's own
    training FLOP count per sample (m2das.model; built on the meta device, no memory)."""
    import torch

    from m2das.model import create_model

    with torch.device("meta"):
        flops = create_model(model, num_classes=527).train_flops_per_sample()
    return round(TARGET_MFU * DENSE_BF16_PEAK_TFLOPS[gpu] * 1e12 / flops)
