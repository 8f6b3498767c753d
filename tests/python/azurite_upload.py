"""Creates a container in Azurite and uploads a folder's files under a prefix.

Usage: azurite_upload.py BLOB_ENDPOINT CONTAINER PREFIX DIR [FILE ...]
(object_store cannot create containers, so the tests use Azure's own SDK for this.)
"""

import os
import sys

from azure.storage.blob import BlobServiceClient

ACCOUNT = "devstoreaccount1"
# Azurite's published development key.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

endpoint, container, prefix, folder, *only = sys.argv[1:]
service = BlobServiceClient(account_url=f"{endpoint}/{ACCOUNT}", credential={"account_name": ACCOUNT, "account_key": KEY})
client = service.get_container_client(container)
if not client.exists():
    client.create_container()
for name in sorted(os.listdir(folder)):
    if only and name not in only:
        continue
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            client.upload_blob(f"{prefix}/{name}", f, overwrite=True)
print("uploaded")
