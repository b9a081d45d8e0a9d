"""Reads a distill dataset with pyarrow alone, as any Python user would, and prints it as JSON.

Usage: read_dataset.py URI   (a local directory or s3://bucket/prefix; S3 settings from AWS_* env)
"""
import json
import os
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def filesystem(uri):
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        scheme = "http" if endpoint.startswith("http://") else "https"
        fs = pafs.S3FileSystem(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            region=os.environ.get("AWS_REGION", "us-east-1"),
            endpoint_override=endpoint.split("://", 1)[-1] or None,
            scheme=scheme,
        )
        return fs, uri[len("s3://"):].rstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), path.rstrip("/")


def main():
    fs, root = filesystem(sys.argv[1])
    with fs.open_input_stream(f"{root}/_manifest.json") as f:
        manifest = json.loads(f.read())
    rows = []
    metadata = None
    for shard in manifest["shards"]:
        table = pq.read_table(f"{root}/{shard['path']}", filesystem=fs)
        assert table.num_rows == shard["rows"], (shard["path"], table.num_rows, shard["rows"])
        md = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.decode().startswith("distill.")}
        metadata = metadata or md
        rows.extend(table.to_pylist())
    print(json.dumps({"layout": manifest["layout"], "rows": rows, "metadata": metadata}))


if __name__ == "__main__":
    main()
