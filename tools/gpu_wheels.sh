#!/usr/bin/env bash
# Fill .whl/ with the wheels tools/gpu_check.sh needs on the lent GPU machine and that its image
# lacks (it has Python 3.12, torch 2.11+cu130, transformers, accelerate, numpy, pyarrow, pytest,
# hypothesis, ninja, cmake, scikit-build-core, but no network): DeepSpeed and what it and
# math-verify need. The versions are the ones this project is tested with here.
#
# DeepSpeed publishes only a source archive; it is built here into a pure-Python wheel (no ops
# compiled ahead: DS_BUILD_OPS=0, its default). Needs pip, network to PyPI, and torch in the
# Python that runs it (DeepSpeed's setup.py imports it).
#
# Usage: tools/gpu_wheels.sh   (then pass .whl in the device tool's carry; it is git-ignored)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
dest=$repo/.whl
mkdir -p "$dest"

pure=(hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0 math-verify==0.9.0 latex2sympy2-extended==1.11.0
      antlr4-python3-runtime==4.13.2)
binary=(pydantic-core==2.50.5)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${binary[@]}"
# Pure-Python ones: any wheel, or one built from the source archive (antlr4's runtime has none).
"$python" -m pip wheel -q --no-deps -w "$dest" "${pure[@]}"
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" deepspeed==0.19.8

# One version of each package, or pip --target stops on the clash.
dupes=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z $dupes ]] || { echo "gpu_wheels: several versions of: $dupes (clean $dest)" >&2; exit 1; }
ls -1 "$dest"/*.whl | xargs -n1 basename
echo "gpu_wheels: $(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
