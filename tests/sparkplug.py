"""Encodes Sparkplug B payloads with pysparkplug (PyPI), an implementation edgeferry did not
write, for tests/sparkplug.rs. Reads a JSON list of messages on stdin:
  {"type": "NBIRTH"|"NDATA"|"DBIRTH"|"DDATA"|"NDEATH"|"DDEATH", "seq": int, "timestamp": ms,
   "metrics": [{"name": str|null, "alias": int|null, "datatype": "DOUBLE"|..., "value": ...,
                "timestamp": ms|null, "is_historical": bool}]}
and prints each message's payload as one line of hex. With --decode, reads hex payloads (one
per line) and prints each as JSON (the metrics' names and values), to check what edgeferry
published (its rebirth requests).
"""
import json
import sys

import pysparkplug as sp

KINDS = {
    "NBIRTH": sp.NBirth,
    "NDATA": sp.NData,
    "DBIRTH": sp.DBirth,
    "DDATA": sp.DData,
}


def metric(m, default_ts):
    return sp.Metric(
        timestamp=m.get("timestamp", default_ts),
        name=m.get("name"),
        datatype=getattr(sp.DataType, m["datatype"]),
        value=m.get("value"),
        alias=m.get("alias"),
        is_historical=m.get("is_historical", False),
        is_null=m.get("value") is None,
    )


def encode(msg):
    ts = msg["timestamp"]
    metrics = tuple(metric(m, ts) for m in msg.get("metrics", []))
    if msg["type"] == "NDEATH":
        return sp.NDeath(timestamp=ts, bd_seq_metric=metrics[0]).encode()
    if msg["type"] == "DDEATH":
        return sp.DDeath(timestamp=ts, seq=msg["seq"]).encode()
    return KINDS[msg["type"]](timestamp=ts, seq=msg["seq"], metrics=metrics).encode()


def main():
    if "--decode" in sys.argv:
        for line in sys.stdin:
            cmd = sp.NCmd.decode(bytes.fromhex(line.strip()))
            print(json.dumps([{"name": m.name, "value": m.value} for m in cmd.metrics]))
        return
    for msg in json.load(sys.stdin):
        print(encode(msg).hex())


if __name__ == "__main__":
    main()
