"""How `fsar-store info` prints a store: its info as aligned lines, and byte counts for people.

`info_lines(store.info())` -> ["store        ...", "dataset      ...", ...].
"""

from __future__ import annotations

from typing import Any

from .sizes import size_lines, taps_text


def human_bytes(n: float | None) -> str:
    """1234567 -> "1.2 MB" (powers of 1000); None -> "n/a"."""
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def info_lines(info: dict[str, Any]) -> list[str]:
    """The lines of `fsar-store info` for `FeatureStore.info()`."""
    out: list[str] = []
    spec = info["spec"]
    out.append(f"store        {info['location']}  (schema {info['schema_version']})")
    out.append(f"dataset      {info['dataset']}  splits from {info['split_source']}")
    out.append(f"fingerprint  {info['fingerprint']}")
    out.append(
        f"model        {spec['model']}  pretrained={spec['pretrained']}  "
        f"weights sha256={str(spec['weights_sha256'])[:16]}"
    )
    out.append(
        f"recipe       {spec['recipe']}  layers={spec['layers']}  T={spec['frames']} V={spec['views']}  "
        f"L={spec['tokens']} D={spec['dim']}  {spec['dtype']}  codec={spec.get('codec')}"
    )
    if spec.get("taps"):
        out.append(f"taps         {taps_text(spec['taps'])}  W={spec['width']}  (resid/layerKK)")
    out.append(f"preprocess   {spec['preprocess'].get('name')}  image {spec['image_size']}")
    out.append(f"classes      {info['classes']}   rows {info['rows']}")
    for split, counts in info["counts"].items():
        parts = "  ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        out.append(f"  {split:<6} {parts}")
    if info["errors"]:
        out.append("failed       " + ", ".join(f"{k}: {v}" for k, v in info["errors"].items()))
    out.append(
        f"size         {human_bytes(info['bytes_on_disk'])} on disk, "
        f"{human_bytes(info['bytes_per_video'])} per video "
        f"({human_bytes(info['raw_bytes_per_video'])} uncompressed)"
    )
    if info["text"]:
        out.append(
            "text         "
            + ", ".join(f"text/{k} ({n} templates)" for k, n in info["text"].items())
        )
    if info["weights"]:
        out.append("weights      " + ", ".join(info["weights"]))
    out.append("per video, every recipe at this model, T and V:")
    out += [f"  {line}" for line in size_lines(spec)]
    return out
