"""Large bodies stream both ways with bounded memory; checksums at both ends."""
import hashlib
import time

import requests

from .apps import pattern

SIZE = 200 * 1024 * 1024
H = {"Host": "app.test"}
MAX_RSS_GROWTH_KB = 64 * 1024


def sha256_of_pattern(size):
    h = hashlib.sha256()
    for chunk in pattern(size):
        h.update(chunk)
    return h.hexdigest()


def _baseline(*procs):
    return {p.pid: p.rss_kb("VmRSS") for p in procs}


def _growth(base, *procs):
    return {p.args[4] if len(p.args) > 4 else p.pid: p.rss_kb("VmHWM") - base[p.pid] for p in procs}


def test_200mb_download_and_upload_with_bounded_memory(server, start_client):
    client = start_client()
    assert requests.get(server.url("/hello"), headers=H, timeout=10).status_code == 200  # warm up
    base = _baseline(server, client)
    expected = sha256_of_pattern(SIZE)

    start = time.monotonic()
    digest, got = hashlib.sha256(), 0
    with requests.get(server.url(f"/download/{SIZE}"), headers=H, stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(SIZE)
        for chunk in r.iter_content(256 * 1024):
            digest.update(chunk)
            got += len(chunk)
    down_s = time.monotonic() - start
    assert got == SIZE and digest.hexdigest() == expected

    start = time.monotonic()
    r = requests.post(server.url("/upload"), headers=H, data=pattern(SIZE), timeout=120)  # chunked
    up_s = time.monotonic() - start
    assert r.status_code == 200
    assert r.json() == {"size": SIZE, "sha256": expected}

    growth = {"server": server.rss_kb("VmHWM") - base[server.pid],
              "client": client.rss_kb("VmHWM") - base[client.pid]}
    print(f"\n200 MB download {SIZE / down_s / 1e6:.1f} MB/s, upload {SIZE / up_s / 1e6:.1f} MB/s, "
          f"peak RSS growth {growth} KiB")
    assert growth["server"] < MAX_RSS_GROWTH_KB, growth
    assert growth["client"] < MAX_RSS_GROWTH_KB, growth


def test_a_slow_public_reader_keeps_reverstd_memory_bounded(server, start_client):
    """A 200 MB download read at ~4 MB/s: flow control must hold the tunnel client back
    (aioquic: per stream, as the data is read; qh3: per connection, by the budget) instead
    of reverstd buffering what the tunnel can push, ~25x faster on loopback."""
    client = start_client()
    assert requests.get(server.url("/hello"), headers=H, timeout=10).status_code == 200  # warm up
    base = _baseline(server)
    rate, seconds, got = 4 * 1024 * 1024, 6.0, 0
    start = time.monotonic()
    with requests.get(server.url(f"/download/{SIZE}"), headers=H, stream=True, timeout=30) as r:
        assert r.status_code == 200
        for chunk in r.iter_content(64 * 1024):
            got += len(chunk)
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            if time.monotonic() - start > seconds:
                break
    growth = server.rss_kb("VmHWM") - base[server.pid]
    print(f"\nslow reader: {got / 1e6:.1f} MB read in {seconds:.0f} s, reverstd peak RSS growth {growth} KiB")
    assert 0.5 * rate * seconds < got < 1.5 * rate * seconds + 8 * 1024 * 1024
    assert growth < MAX_RSS_GROWTH_KB, growth
    assert requests.get(server.url("/hello"), headers=H, timeout=10).text == "Hello, World!"
    assert client.popen.poll() is None


def test_response_without_content_length_is_chunked_and_complete(tunnel):
    size = 5 * 1024 * 1024 + 7
    with requests.get(tunnel.url(f"/stream/{size}"), headers=H, stream=True, timeout=30) as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        body = b"".join(r.iter_content(65536))
    assert len(body) == size
    assert hashlib.sha256(body).hexdigest() == sha256_of_pattern(size)


def test_public_client_abandoning_a_download_does_not_hurt_the_tunnel(tunnel):
    with requests.get(tunnel.url(f"/download/{SIZE}"), headers=H, stream=True, timeout=30) as r:
        next(r.iter_content(65536))
    # the response was cut by us; the tunnel keeps serving
    for _ in range(3):
        assert requests.get(tunnel.url("/hello"), headers=H, timeout=10).text == "Hello, World!"


def test_parallel_downloads_and_uploads_sharing_packets_arrive_intact(server, start_client):
    """Four downloads and four uploads at once on one tunnel: their streams share packets,
    and the transport joins each stream's consecutive pieces before HTTP/3 parses them
    (Connection._process_events). Every body must arrive whole, in order, unmixed."""
    import concurrent.futures
    start_client()
    assert requests.get(server.url("/hello"), headers=H, timeout=10).status_code == 200  # warm up
    sizes = [8 * 1024 * 1024 + n * 4099 for n in range(4)]  # different lengths: no two bodies alike

    def download(size):
        digest, got = hashlib.sha256(), 0
        with requests.get(server.url(f"/download/{size}"), headers=H, stream=True, timeout=60) as r:
            assert r.status_code == 200
            for chunk in r.iter_content(64 * 1024):
                digest.update(chunk)
                got += len(chunk)
        return got, digest.hexdigest()

    def upload(size):
        r = requests.post(server.url("/upload"), headers=H, data=pattern(size), timeout=60)
        assert r.status_code == 200
        return r.json()["size"], r.json()["sha256"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        downs = [pool.submit(download, size) for size in sizes]
        ups = [pool.submit(upload, size) for size in sizes]
        for size, down, up in zip(sizes, downs, ups):
            expected = (size, sha256_of_pattern(size))
            assert down.result(timeout=90) == expected
            assert up.result(timeout=90) == expected
