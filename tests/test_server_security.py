"""The hardening of ``cxrlab serve`` (issue 25), against a real uvicorn server on a loopback port: a
chunked oversize body is refused before it is read, the token, the Host allow-list, the security
headers, the cap on uploads in flight (503), the body deadline (408); the options are checked before
the model is loaded, and a failed start leaves no temporary folder. Raw sockets where the client's
own behaviour matters (a body that never ends, one that stalls)."""
from __future__ import annotations

import logging
import socket
import time

import pytest
from test_export import one_thread  # noqa: F401 (autouse)
from test_server import model_files, running  # noqa: F401 (fixture)

from cxrlab.errors import CxrlabError

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "a-test-token-of-32-characters-xx"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send ``head`` (request line and headers) and ``body`` as they are; the status, headers and body."""
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    top, _, content = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, content


@pytest.fixture(scope="module")
def guarded(model_files, tmp_path_factory):  # noqa: F811
    from cxrlab.inference.server import create_app

    uploads = tmp_path_factory.mktemp("uploads")
    app = create_app(model_files[1], workers=1, queue=1, max_upload_bytes=2 * 2**20, token=TOKEN,
                     hosts=("127.0.0.1", "localhost"), tmp_dir=uploads)
    with running(app) as url:
        yield url, uploads


def auth(token=TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_chunked_oversize_body_is_refused_before_it_is_read(guarded):
    """A 100 MB chunked body (no Content-Length) against a 2 MiB limit: 413 once the limit and a little
    more have come in; the client could not send the rest. Before: the server read all 100 MB first."""
    url, _ = guarded
    s = socket.create_connection(("127.0.0.1", port_of(url)), timeout=10)
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
              "Content-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    piece, sent = b"10000\r\n" + bytes(2**16) + b"\r\n", 0
    s.settimeout(2)
    try:
        while sent < 100 * 2**20:
            s.sendall(piece)
            sent += 2**16
    except OSError:  # the server answered and closed: the rest cannot be sent
        pass
    s.settimeout(10)
    answer = s.recv(65536)
    s.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 2,097,152 bytes" in answer
    assert sent < 30 * 2**20, f"{sent / 2**20:.0f} MB went in before the answer"


def test_token_is_required_on_the_api_only(guarded, shared_data):
    url, _ = guarded
    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    with httpx.Client(base_url=url, timeout=30) as c:
        missing = c.get("/labels")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in missing.json()["detail"]
        assert c.get("/labels", headers=auth("a-wrong-token-of-32-characters-x")).status_code == 401
        assert c.get("/labels", headers={"Authorization": TOKEN}).status_code == 401  # no scheme
        assert c.post("/predict", files={"files": ("a.png", data)}).status_code == 401
        assert c.get("/labels", headers=auth()).status_code == 200
        assert c.get("/labels", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        assert c.post("/predict", files={"files": ("a.png", data)}, headers=auth()).status_code == 200
        for path in ("/", "/health", "/static/app.js", "/docs", "/openapi.json"):  # the page shell: open
            assert c.get(path).status_code == 200, path


def test_foreign_host_is_400(guarded):
    url, _ = guarded
    port = port_of(url)
    status, _, body = raw(url, f"GET /health HTTP/1.1\nHost: evil.example:{port}\nConnection: close\n")
    assert status == 400 and b"Host 'evil.example:" in body and b"--allowed-hosts" in body
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", "127.0.0.1"):
        assert raw(url, f"GET /health HTTP/1.1\nHost: {host}\nConnection: close\n")[0] == 200, host
    assert raw(url, f"GET /health HTTP/1.1\nHost: [::1]:{port}\nConnection: close\n")[0] == 400  # not listed


def test_allowed_hosts_default_and_explicit():
    from cxrlab.inference.security import allowed_hosts, host_name

    assert allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts("0.0.0.0") == ("localhost", "127.0.0.1", "::1")  # a wildcard is no name
    assert allowed_hosts("10.1.2.3") == ("10.1.2.3", "localhost", "127.0.0.1", "::1")
    assert allowed_hosts("0.0.0.0", "Xray.Example.org, [::1]") == ("xray.example.org", "::1")
    with pytest.raises(CxrlabError, match="--allowed-hosts"):
        allowed_hosts("127.0.0.1", " , ")
    assert [host_name(h) for h in (b"A.org:80", b"[::1]:8000", b"::1", b"a.org")] == ["a.org", "::1", "::1", "a.org"]


def test_security_headers_on_page_api_and_refusals(guarded):
    url, _ = guarded
    with httpx.Client(base_url=url, timeout=30) as c:
        answers = {"page": c.get("/"), "docs": c.get("/docs"), "api": c.get("/labels", headers=auth()),
                   "401": c.get("/labels"), "413": c.post("/predict", content=bytes(2 * 2**20 + 1), headers=auth()),
                   "script": c.get("/static/app.js")}
    for name, response in answers.items():
        h = response.headers
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", name
        assert h["referrer-policy"] == "no-referrer", name
        csp = h["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "object-src 'none'" in csp, name
    assert answers["413"].status_code == 413
    assert answers["api"].headers["cache-control"] == "no-store"  # answers about images are not cached
    assert "no-store" not in answers["script"].headers.get("cache-control", "")
    # the page's own files keep to the policy: no inline script, nothing from elsewhere
    assert "<script>" not in answers["page"].text and "<script src=\"/static/" in answers["page"].text


def stalled_upload(url: str, declared: int = 2**19, sent: int = 2**16) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port_of(url)), timeout=10)
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + bytes(sent))
    return s


def test_uploads_in_flight_are_capped_and_a_stalled_body_times_out(model_files, shared_data):  # noqa: F811
    """Two stalled uploads fill the cap: a third gets 503 at once (before: every one was taken in and
    held as long as its client liked); after the 1.5 s deadline both stalled ones get 408 and their
    places are free again."""
    from cxrlab.inference.server import create_app

    data = (shared_data / "nih" / "00000001_000.png").read_bytes()
    app = create_app(model_files[1], workers=1, queue=4, max_uploads=2, read_timeout=1.5)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        start = time.monotonic()
        stalled = [stalled_upload(url), stalled_upload(url)]
        time.sleep(0.3)
        busy = c.post("/predict", files={"files": ("a.png", data)})
        assert busy.status_code == 503 and "2 uploads in progress" in busy.json()["detail"]
        assert busy.headers["retry-after"] == "5" and time.monotonic() - start < 1.5
        assert c.get("/health").status_code == 200  # requests without a body are not counted
        for s in stalled:
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"not received within 1.5 s" in answer
            s.close()
        assert 1.4 < time.monotonic() - start < 5
        assert c.post("/predict", files={"files": ("a.png", data)}).status_code == 200


def test_a_large_upload_waits_on_disk_and_leaves_nothing(guarded, shared_data):
    """A body over the in-memory size is spooled to the server's own folder and gone after the answer."""
    from cxrlab.inference.security import SPOOL_IN_MEMORY

    url, uploads = guarded
    png = (shared_data / "nih" / "00000001_000.png").read_bytes()
    padded = png + bytes(SPOOL_IN_MEMORY - len(png) + 4096)  # data after IEND: ignored by the decoder
    assert SPOOL_IN_MEMORY < len(padded) < 2 * 2**20
    with httpx.Client(base_url=url, timeout=30) as c:
        response = c.post("/predict", files={"files": ("a.png", padded)}, headers=auth())
    assert response.status_code == 200, response.text
    assert list(uploads.iterdir()) == []


# ----------------------------------------------------------------------------------- start and options

@pytest.mark.parametrize("argv, message", [
    (["--port", "99999"], "--port 99999: expected 1-65535"),
    (["--port", "0"], "--port 0: expected 1-65535"),
    (["--workers", "0"], "--workers 0: expected at least 1"),
    (["--queue", "-5"], "--queue -5: expected 0 or more"),
    (["--max-upload-mb", "-1"], "--max-upload-mb -1.0: expected a finite number > 0"),
    (["--max-upload-mb", "nan"], "--max-upload-mb nan: expected a finite number > 0"),
    (["--read-timeout", "0"], "--read-timeout 0.0: expected a finite number > 0"),
    (["--timeout", "inf"], "--timeout inf: expected a finite number > 0"),
    (["--max-uploads", "0"], "--max-uploads 0: expected at least 1"),
    (["--token", "short"], "the token has 5 characters; use at least 16"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is not a loopback address"),
    (["--allowed-hosts", ","], "--allowed-hosts ',': expected comma-separated"),
])
def test_bad_options_are_refused_before_the_model_is_loaded(argv, message, tmp_path, capsys, monkeypatch):
    """The model does not exist: an option error, not 'checkpoint not found', shows the order."""
    from cxrlab.cli import main

    monkeypatch.delenv("CXRLAB_TOKEN", raising=False)
    assert main(["serve", str(tmp_path / "missing"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "not found" not in err and len(err.strip().splitlines()) == 1


def test_remote_host_needs_a_token_or_the_flag(tmp_path, capsys, monkeypatch):
    """With a token (the option or CXRLAB_TOKEN) or the explicit flag, a non-loopback --host goes on to
    load the model (here: missing, so that is the error)."""
    from cxrlab.cli import main

    missing = str(tmp_path / "missing")
    monkeypatch.delenv("CXRLAB_TOKEN", raising=False)
    for extra in (["--token", TOKEN], ["--allow-remote-without-token"]):
        assert main(["serve", missing, "--host", "0.0.0.0", "--port", str(free()), *extra]) == 2
        assert "checkpoint not found" in capsys.readouterr().err
    monkeypatch.setenv("CXRLAB_TOKEN", TOKEN)
    assert main(["serve", missing, "--host", "0.0.0.0", "--port", str(free())]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    monkeypatch.setenv("CXRLAB_TOKEN", "short")  # the environment's token is checked like the option
    assert main(["serve", missing, "--port", str(free())]) == 2
    assert "the token has 5 characters" in capsys.readouterr().err


def free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_busy_port_is_refused_before_loading(tmp_path, capsys):
    from cxrlab.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_failed_start_leaves_no_temp_folder_and_uvicorn_gets_the_limits(model_files, tmp_path, monkeypatch,  # noqa: F811
                                                                       caplog):
    """uvicorn failing after the model is loaded (as a port taken in the meantime does): the server's
    temporary folder is removed and tempfile's default restored; the warning for a remote address."""
    import tempfile

    import uvicorn

    from cxrlab.inference.server import serve

    calls = {}

    def failing_run(app, **options):
        calls.update(options, tmp=app.app_state.tmp_root, guard=app)
        assert tempfile.tempdir == str(app.app_state.tmp_root)  # multipart spooling goes there too
        raise SystemExit(3)  # what uvicorn does when it cannot bind

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(uvicorn, "run", failing_run)
    with caplog.at_level(logging.WARNING, logger="cxrlab.serve"), pytest.raises(SystemExit):
        serve(model_files[1], host="0.0.0.0", port=free(), token=TOKEN)
    assert calls["tmp"].parent == tmp_path and not calls["tmp"].exists() and list(tmp_path.iterdir()) == []
    assert tempfile.tempdir == str(tmp_path)
    assert calls["timeout_keep_alive"] == 5 and calls["h11_max_incomplete_event_size"] == 16 * 2**10
    assert calls["guard"].hosts == {"localhost", "127.0.0.1", "::1"} and calls["guard"].max_uploads == 2 + 8
    assert "0.0.0.0 is reachable from other machines over plain HTTP" in caplog.text


def test_cli_serve_security_defaults():
    from cxrlab.cli import build_parser

    args = build_parser().parse_args(["serve", "model.onnx"])
    assert (args.token, args.allowed_hosts, args.max_uploads, args.read_timeout, args.allow_remote_without_token) \
        == (None, None, None, 60.0, False)


def test_page_asks_for_the_token_and_works_under_the_policy(model_files, shared_data):  # noqa: F811
    """In a real headless browser (skipped without chromium): the page of a server with a token asks for
    it once, then lists the labels and draws the heatmap, all under the Content-Security-Policy."""
    from test_browser import CHROMEDRIVER, _image_loaded, _wait

    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not CHROMEDRIVER.exists() or not chromium:
        pytest.skip("no chromium/chromium-driver here")
    from cxrlab.inference.server import create_app

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        with running(create_app(model_files[1], workers=1, token=TOKEN)) as url:
            driver.get(url)
            alert = _wait(driver, lambda d: d.switch_to.alert)
            assert "access token" in alert.text
            alert.send_keys(TOKEN)
            alert.accept()
            _wait(driver, lambda d: "labels" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file").send_keys(str(shared_data / "nih" / "00000001_000.png"))
            rows = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#labels tbody tr"))
            assert len(rows) == 3
            assert _wait(driver, lambda d: _image_loaded(d, "heatmap"))  # a blob: image, allowed by img-src
            assert driver.execute_script("return sessionStorage.getItem('cxrlab-token')") == TOKEN
    finally:
        driver.quit()
