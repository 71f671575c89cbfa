# Source on the GPU machine (repo root as cwd): makes `import vlt, vlt.layers, vlt.kernels, vlt.data`
# work without pip-installing the repo, via a symlink farm that mirrors pyproject's package-dir.
#   bash .whl/install.sh && source tools/devpath.sh
_root=$(pwd)
rm -rf /tmp/vltpkg && mkdir -p /tmp/vltpkg/vlt
for f in "$_root"/vlt/*; do ln -s "$f" /tmp/vltpkg/vlt/; done
for d in layers data kernels; do [ -d "$_root/$d" ] && ln -sfn "$_root/$d" /tmp/vltpkg/vlt/$d; done
export PYTHONPATH=/tmp/vltpkg:/tmp/site
# The GPU image's Python keeps no bytecode between processes: a warm `vlt generate` there spent 10.4 s in
# compile() of module sources (cProfile, 2026-12-01: 3,859 modules, torch's among them), which a normal pip
# install (with .pyc files) does not. A writable cache prefix makes later processes read bytecode, as on a
# user's machine; the first process on a fresh machine still compiles.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
