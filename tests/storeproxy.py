"""A TCP proxy on 127.0.0.1 in front of the test S3 server that a test switches to fail like a network.

Modes: "pass" forwards; "refuse" closes the listening socket (a client's connect is refused, as when
the store's host is down); "drop" also cuts the connections already open (a load balancer restarting);
"unavailable" cuts them and answers every new request with HTTP 503 ServiceUnavailable (an overloaded store).
"""

import socket
import threading


class StoreProxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.mode = "pass"
        self._lock = threading.Lock()
        self._conns = set()
        self._listener = None
        self.port = self._listen(0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return s.getsockname()[1]

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by set("refuse")
                return
            if self.mode == "unavailable":
                threading.Thread(target=self._answer_503, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _answer_503(self, client) -> None:
        body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>" \
               b"<Message>Service is unavailable</Message></Error>"
        try:
            client.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request and (part := client.recv(65536)):
                request += part
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                           % (len(body), b"" if request.startswith(b"HEAD ") else body))
        except OSError:
            pass
        finally:
            client.close()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def set(self, mode: str) -> None:
        """Switch to "pass", "refuse", "drop" or "unavailable"."""
        if mode == self.mode:
            return
        listening, previous = ("pass", "unavailable"), self.mode
        self.mode = mode  # before any new connection is accepted or an open one cut
        if mode in listening and previous not in listening:
            self.port = self._listen(self.port)
        elif mode not in listening and previous in listening:
            self._stop_listening()
        if mode in ("drop", "unavailable"):
            with self._lock:
                conns = list(self._conns)
            for s in conns:
                self._close(s)

    def _stop_listening(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._listener.close()

    def close(self) -> None:
        if self.mode in ("pass", "unavailable"):
            self._stop_listening()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._close(s)
