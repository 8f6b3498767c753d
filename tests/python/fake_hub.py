"""A local stand-in for the Hugging Face Hub, serving one model repository from a folder.

It implements what Pagoda and huggingface_hub use, with the Hub's headers:
  GET  /api/models/{repo}/revision/{rev}[?blobs=true]  the commit and files (size, blobId, lfs)
  GET  /api/models/{repo}/tree/{rev}                   the files as huggingface_hub lists them
  GET|HEAD /{repo}/resolve/{rev}/{file}                small files directly (ETag: git blob id);
        LFS files by a 302 to /cdn/{sha256} on another host name (localhost rather than
        127.0.0.1), with X-Linked-Etag and X-Linked-Size, as the Hub redirects to its CDN
  GET  /cdn/{sha256}                                   the bytes, with ranges (206, Content-Range)
  GET  /_log                                           every request so far, as JSON
Errors carry X-Error-Code as the Hub's do: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo.

Usage: fake_hub.py --repo org/name --dir FOLDER [--token T] [--throttle SECONDS_PER_MIB] [--corrupt]
With --token the repository is gated: T opens it, hf_noaccess is a valid token without access
(403), any other token is invalid (401).
Prints the port and the commit on the first two lines of stdout, then serves until killed."""
import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--repo", required=True)
parser.add_argument("--dir", required=True)
parser.add_argument("--token")
parser.add_argument("--throttle", type=float, default=0.0)
parser.add_argument("--corrupt", action="store_true", help="flip a byte of every LFS file the CDN serves")
args = parser.parse_args()

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
files = {}
for root, _, names in os.walk(args.dir):
    for name in names:
        path = os.path.join(root, name)
        rel = os.path.relpath(path, args.dir).replace(os.sep, "/")
        data = open(path, "rb").read()
        entry = {"path": path, "size": len(data)}
        if rel.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            entry["lfs"] = sha
            entry["blob_id"] = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
        else:
            entry["blob_id"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        files[rel] = entry
COMMIT = hashlib.sha1(json.dumps(sorted((k, v["blob_id"]) for k, v in files.items())).encode()).hexdigest()
by_sha = {e["lfs"]: e for e in files.values() if "lfs" in e}
log = []
log_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def record(self):
        with log_lock:
            log.append({"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                        "auth": self.headers.get("Authorization")})

    def reply(self, status, body=b"", headers=None, code=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, code, message):
        self.reply(status, json.dumps({"error": message}).encode(), {"Content-Type": "application/json"}, code)

    def authorized(self):
        """The gate of a gated repo: None when the request may go on."""
        if args.token is None:
            return True
        auth = self.headers.get("Authorization")
        if auth is None:
            self.error(401, "GatedRepo", "Access to model is restricted. You must have access to it and be authenticated.")
            return False
        if auth == "Bearer hf_noaccess":
            # A valid token whose account has not been granted the gated model.
            self.error(403, "GatedRepo", "Access to model is restricted and you are not in the authorized list.")
            return False
        if auth != f"Bearer {args.token}":
            self.error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.record()
        path = self.path.split("?")[0]
        if path == "/_log":
            with log_lock:
                return self.reply(200, json.dumps(log).encode(), {"Content-Type": "application/json"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            return self.revision(m.group(1), m.group(2))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        if m:
            return self.tree(m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self.resolve(m.group(1), m.group(2), m.group(3))
        m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if m and m.group(1) in by_sha:
            return self.content(by_sha[m.group(1)], {"ETag": f'"{m.group(1)}"'})
        self.error(404, None, "not found")

    def known_revision(self, rev):
        from urllib.parse import unquote
        return unquote(rev) in ("main", COMMIT)

    def revision(self, repo, rev):
        if repo != args.repo:
            return self.error(401 if self.headers.get("Authorization") is None else 404, "RepoNotFound", "Repository not found")
        if not self.authorized():
            return
        if not self.known_revision(rev):
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        siblings = []
        for name, e in sorted(files.items()):
            s = {"rfilename": name, "size": e["size"], "blobId": e["blob_id"]}
            if "lfs" in e:
                s["lfs"] = {"sha256": e["lfs"], "size": e["size"], "pointerSize": 134}
            siblings.append(s)
        body = {"_id": "0", "id": args.repo, "modelId": args.repo, "sha": COMMIT, "private": False,
                "gated": args.token is not None and "manual", "siblings": siblings}
        self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def tree(self, repo, rev):
        """The file listing huggingface_hub's snapshot_download reads (one page, recursive)."""
        if repo != args.repo:
            return self.error(401, "RepoNotFound", "Repository not found")
        if not self.authorized():
            return
        if not self.known_revision(rev):
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        entries = []
        for name, e in sorted(files.items()):
            entry = {"type": "file", "oid": e["blob_id"], "size": e["size"], "path": name}
            if "lfs" in e:
                entry["lfs"] = {"oid": e["lfs"], "size": e["size"], "pointerSize": 134}
            entries.append(entry)
        self.reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def resolve(self, repo, rev, name):
        from urllib.parse import unquote
        name = unquote(name)
        if repo != args.repo:
            return self.error(401, "RepoNotFound", "Repository not found")
        if not self.authorized():
            return
        if not self.known_revision(rev):
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        e = files.get(name)
        if e is None:
            return self.error(404, "EntryNotFound", f"{name} does not exist on {rev}")
        common = {"X-Repo-Commit": COMMIT}
        if "lfs" in e:
            host_port = self.server.server_address[1]
            return self.reply(302, b"", dict(common, **{
                "Location": f"http://localhost:{host_port}/cdn/{e['lfs']}",
                "X-Linked-Etag": f'"{e["lfs"]}"', "X-Linked-Size": str(e["size"]), "ETag": f'"{e["blob_id"]}"'}))
        self.content(e, dict(common, **{"ETag": f'"{e["blob_id"]}"'}))

    def content(self, e, headers):
        data = open(e["path"], "rb").read()
        start, end = 0, len(data)
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
            status = 206
            headers = dict(headers, **{"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
        body = data[start:end]
        if args.corrupt and "lfs" in e and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(status)
        for k, v in dict(headers, **{"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        chunk = 1 << 16
        for i in range(0, len(body), chunk):
            self.wfile.write(body[i:i + chunk])
            if args.throttle:
                time.sleep(args.throttle * chunk / (1 << 20))


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
print(COMMIT, flush=True)
server.serve_forever()
