# Shared by the scripts: install what is missing, quietly and only when missing.
# Sourced, not run.

# Where builds are cached: outside the clone, so a fresh clone (CI) reuses earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tandem/target}"
# Incremental artifacts of the linked faiss test binaries grow by gigabytes per rebuild; a
# clean-clone CI run gains nothing from them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

_apt_updated=""

# ensure_apt PKG...: installs the Debian packages that are not installed yet.
ensure_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing ${missing[*]} (apt)" >&2
  if [ -z "$_apt_updated" ]; then
    $sudo apt-get update -qq >/dev/null
    _apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
}

# What building tandem needs: faiss is compiled from source (cmake, a C++ compiler, BLAS/LAPACK);
# librdkafka too (its cmake build includes curl's headers even with curl off); the etcd client
# (etcd-client crate) compiles etcd's .proto files with protoc.
ensure_build_deps() {
  ensure_rust
  ensure_apt cmake g++ libopenblas-dev libcurl4-openssl-dev protobuf-compiler
}

# A real etcd for the discovery (and arbiter) tests: Debian's etcd-server provides /usr/bin/etcd.
# The tests start their own on free ports; the package's own service, if it starts, is not used.
ensure_etcd() {
  [ -x /usr/bin/etcd ] || ensure_apt etcd-server
}

# Tools installed by the scripts (tansu, pulsar-lite) live here.
export PATH="$HOME/.cache/tandem/tools/bin:$PATH"
