"""Stage the chart for a release: the tag's version as version and appVersion, the published image as default.

    python3 .github/scripts/package_chart.py --chart chart --version 1.2.3 \\
        --image ghcr.io/acme/catalog --digest sha256:<64 hex> --output <dir>

writes <dir>/catalog, a copy of the chart whose Chart.yaml says `version: 1.2.3` and `appVersion: "1.2.3"`
and whose values.yaml runs the image by repository and digest (the tag defaults to the appVersion), so
`helm install catalog oci://ghcr.io/acme/charts/catalog --version 1.2.3` runs the signed image with no
`--set`. Only those lines change: every comment and `## @param` of values.yaml stays as it is. Standard
library only (it runs on a bare CI runner); `helm lint` and `helm package` come after it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
IMAGE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+$")


def set_top_level(text: str, key: str, value: str) -> str:
    """Replace the one top-level `key: ...` line of a YAML text."""
    pattern = re.compile(rf"^{re.escape(key)}:.*$", re.M)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"expected one top-level `{key}:` line")
    return pattern.sub(f"{key}: {value}", text)


def set_in_block(text: str, block: str, values: dict[str, str]) -> str:
    """Set `key: value` lines directly inside the top-level mapping `block:` (two-space indent)."""
    lines = text.splitlines(keepends=True)
    try:
        start = lines.index(f"{block}:\n")
    except ValueError:
        raise SystemExit(f"no top-level `{block}:` mapping in values.yaml") from None
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "\n", "#")),
        len(lines),
    )
    missing = set(values)
    for i in range(start + 1, end):
        match = re.match(r"^  ([A-Za-z]+):", lines[i])
        if match and match.group(1) in values:
            lines[i] = f"  {match.group(1)}: {values[match.group(1)]}\n"
            missing.discard(match.group(1))
    if missing:
        raise SystemExit(f"`{block}` has no {', '.join(sorted(missing))} in values.yaml")
    return "".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, required=True, help="the chart directory")
    parser.add_argument("--version", required=True, help="the release version (semver, no leading v)")
    parser.add_argument("--image", required=True, help="the published image repository, registry included")
    parser.add_argument("--digest", required=True, help="the published image's digest (sha256:...)")
    parser.add_argument("--output", type=Path, required=True, help="directory to write the chart into")
    args = parser.parse_args(argv)
    if not SEMVER.match(args.version):
        parser.error(f"--version {args.version!r} is not semver")
    if not DIGEST.match(args.digest):
        parser.error(f"--digest {args.digest!r} is not sha256:<64 hex>")
    if not IMAGE.match(args.image):
        parser.error(f"--image {args.image!r} is not a lower-case repository with its registry")

    target = args.output / "catalog"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(args.chart, target)

    chart_yaml = target / "Chart.yaml"
    text = set_top_level(chart_yaml.read_text(), "version", args.version)
    chart_yaml.write_text(set_top_level(text, "appVersion", f'"{args.version}"'))

    values_yaml = target / "values.yaml"
    image = {"repository": args.image, "tag": '""', "digest": args.digest}
    values_yaml.write_text(set_in_block(values_yaml.read_text(), "image", image))
    print(f"{target}: catalog {args.version}, image {args.image}@{args.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
