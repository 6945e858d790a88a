"""download_file against a local HTTP server that breaks off, sends garbage or fails: one HydraError, no file left."""
from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from hydranets import HydraError
from hydranets.data.download import download_file

PAYLOAD = bytes(range(256)) * 20


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.close_connection = True
        if self.path == "/whole":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/short":  # promises more than it sends
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
        elif self.path == "/chunked":  # a chunk cut off mid-way
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"3e8\r\n" + PAYLOAD[:1000] + b"\r\n3e8\r\n" + PAYLOAD[:10])
        elif self.path == "/garbage":  # not HTTP at all
            self.wfile.write(b"NOT HTTP\r\n\r\n")
        else:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def url():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path, words", [
    ("/short", f"stopped at 1000 of {len(PAYLOAD)} bytes"),
    ("/chunked", "broke off after"),
    ("/garbage", "BadStatusLine: NOT HTTP;"),
    ("/error", "Internal Server Error"),
])
def test_a_broken_download_is_one_error_and_leaves_nothing(tmp_path, url, path, words):
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(HydraError, match=words) as err:
        download_file(url + path, dest, md5=hashlib.md5(PAYLOAD).hexdigest(), progress=False, timeout=5)
    assert "\n" not in str(err.value)
    assert not dest.parent.exists()  # not even the folder made for it
    # the next try, with the server whole again, fetches and checks the file
    assert download_file(url + "/whole", dest, md5=hashlib.md5(PAYLOAD).hexdigest(), progress=False) == dest
    assert dest.read_bytes() == PAYLOAD and list(dest.parent.iterdir()) == [dest]


def test_a_damaged_file_in_place_is_fetched_again(tmp_path, url):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(PAYLOAD[:-1] + b"x")  # the right size, the wrong bytes
    download_file(url + "/whole", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_a_failed_download_leaves_no_folder_it_made(url, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kept.txt").write_text("mine")
    with pytest.raises(HydraError, match="Internal Server Error"):
        download_file(f"{url}/error", tmp_path / "data" / "cifar" / "new" / "x.tar.gz", progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["kept.txt"]
    assert download_file(f"{url}/whole", tmp_path / "data" / "cifar" / "x.bin", progress=False).read_bytes() == PAYLOAD
