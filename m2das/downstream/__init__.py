"""The downstream wing: what users do with the weights. Reading weight files, the frozen encoder,
exports for the published runtime, embeddings, and the paper's evaluation protocols."""
