#!/usr/bin/env bash
# CI: the documentation site. Installs the `docs` extra (mkdocs, mkdocs-material,
# mkdocstrings[python]) into .venv with the pinned versions of constraints.txt, then builds the
# site with --strict: a broken link, a page missing from the nav, an unresolved API reference or
# a docstring the API reference cannot parse fails the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || scripts/setup.sh
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[docs]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
export NO_MKDOCS_2_WARNING=1
start=$SECONDS
.venv/bin/python -m mkdocs build --strict --site-dir "$site"
echo "docs: built $(find "$site" -name index.html | wc -l) pages in $((SECONDS - start)) s" >&2
