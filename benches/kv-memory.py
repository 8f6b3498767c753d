"""The resident memory of a `pagoda serve` (the embedded demo model, default 4 GiB CPU KV cache)
before and after N different prompts (default 3,000), 8 at a time, each generating 4 tokens.

Usage: python3 benches/kv-memory.py PATH/TO/pagoda   (N=1000 in the environment for fewer)
Prints one JSON line. A benchmark, not part of CI (issue 15, item 6).
"""
import concurrent.futures, json, os, re, subprocess, sys, time, urllib.request

binary = sys.argv[1]
log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pagoda-kv-memory.log")
log = open(log_path, "w")
proc = subprocess.Popen([binary, "serve", "--host", "127.0.0.1", "--port", "0", "--disable-log-requests"], stderr=log,
                        env={**os.environ, "PAGODA_LOG": "warn,pagoda::cli=info"})
port = None
while port is None:
    time.sleep(0.1)
    m = re.search(r"listening on http://127.0.0.1:(\d+)", open(log_path).read())
    port = m and int(m.group(1))
def rss():
    for l in open(f"/proc/{proc.pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) // 1024
while True:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready").status == 200:
            break
    except Exception:
        time.sleep(0.1)
def post(i):
    body = json.dumps({"prompt": f"request {i}: " + " ".join(str(i * 31 + k) for k in range(40)), "max_tokens": 4,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    return urllib.request.urlopen(req).status
before = rss()
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    statuses = list(pool.map(post, range(int(os.environ.get('N', '3000')))))
time.sleep(1)
after = rss()
print(json.dumps({"binary": binary, "ok": statuses.count(200), "rss_before_mib": before, "rss_after_mib": after}))
proc.kill()
