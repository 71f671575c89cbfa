# Source on the GPU machine (repo root as cwd): makes `import vlt, vlt.layers, vlt.kernels, vlt.data`
# work without pip-installing the repo, via a symlink farm that mirrors pyproject's package-dir.
#   bash .whl/install.sh && source tools/devpath.sh
_root=$(pwd)
rm -rf /tmp/vltpkg && mkdir -p /tmp/vltpkg/vlt
for f in "$_root"/vlt/*; do ln -s "$f" /tmp/vltpkg/vlt/; done
for d in layers data kernels; do [ -d "$_root/$d" ] && ln -sfn "$_root/$d" /tmp/vltpkg/vlt/$d; done
export PYTHONPATH=/tmp/vltpkg:/tmp/site
