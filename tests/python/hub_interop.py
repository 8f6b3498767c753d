"""huggingface_hub and Pagoda share one cache. Usage:
  hub_interop.py read CACHE REPO          huggingface_hub finds REPO in CACHE offline (what Pagoda
                                          downloaded); prints the snapshot folder
  hub_interop.py download CACHE REPO      huggingface_hub downloads REPO into CACHE from HF_ENDPOINT
                                          (config, tokenizer and weights); prints the snapshot folder"""
import os
import sys

from huggingface_hub import snapshot_download

mode, cache, repo = sys.argv[1:4]
patterns = ["*.json", "*.safetensors", "*.jinja"]
if mode == "read":
    path = snapshot_download(repo, cache_dir=cache, local_files_only=True, allow_patterns=patterns)
else:
    path = snapshot_download(repo, cache_dir=cache, endpoint=os.environ["HF_ENDPOINT"], allow_patterns=patterns)
assert os.path.isfile(os.path.join(path, "config.json")), os.listdir(path)
with open(os.path.join(path, "model.safetensors"), "rb") as f:
    assert len(f.read()) > 0
print(path)
