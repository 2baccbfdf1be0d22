# Shared by the scripts: install what is missing, quietly and only when missing.
# Sourced, not run.

# Where builds are cached: outside the clone, so a fresh clone (CI) reuses earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tandem/target}"
# Incremental artifacts of the linked faiss test binaries grow by gigabytes per rebuild; a
# clean-clone CI run gains nothing from them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Tools installed by the scripts (tansu, pulsar-lite, protox) live here.
TANDEM_TOOLS="$HOME/.cache/tandem/tools"
export PATH="$TANDEM_TOOLS/bin:$PATH"

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
  # Two scripts may install at once (./scripts/test and ./scripts/check-fresh side by side):
  # wait for the other's dpkg lock rather than fail on it.
  local lock=(-o DPkg::Lock::Timeout=1200)
  if [ -z "$_apt_updated" ]; then
    $sudo apt-get "${lock[@]}" update -qq >/dev/null
    _apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
}

# ensure_cargo_tool NAME VERSION [CARGO-INSTALL-ARGS...]: installs crate NAME at VERSION into
# $TANDEM_TOOLS with `cargo install` unless $TANDEM_TOOLS/bin/NAME already reports VERSION.
# Prints the binary's path on stdout.
ensure_cargo_tool() {
  local name="$1" version="$2"
  shift 2
  local bin="$TANDEM_TOOLS/bin/$name"
  # cargo install records what it installed in the root's .crates.toml ("protox 0.9.1 (registry…)"
  # = ["protox"]); not every tool has a --version to ask.
  if [ -x "$bin" ] && grep -q "^\"$name $version " "$TANDEM_TOOLS/.crates.toml" 2>/dev/null; then
    echo "$bin"
    return 0
  fi
  ensure_rust
  echo "installing $name $version into $TANDEM_TOOLS (cargo install)" >&2
  local log
  log="$(mktemp)"
  # Without CARGO_TARGET_DIR: cargo install then builds in a temporary dir that it removes,
  # instead of filling tandem's build cache with the tool's.
  if ! env -u CARGO_TARGET_DIR \
    cargo install "$name" --version "$version" --locked --root "$TANDEM_TOOLS" "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    echo "error: installing $name $version failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
  echo "$bin"
}

# protoc for the etcd client: the etcd-client crate compiles etcd's .proto files in its build
# script with whatever `$PROTOC` names, and .cargo/config.toml names scripts/protoc, a wrapper
# around protox. Debian's protobuf-compiler needs libprotobuf-dev beside it for the well-known
# imports (google/protobuf/descriptor.proto), which once went missing on a new machine; protox
# (pure Rust, the compiler tandem's own protos already use) carries the well-known files inside
# and takes protoc's command line, so no Debian package is needed.
ensure_protoc() {
  ensure_cargo_tool protox 0.9.1 --features bin >/dev/null || exit 1
}

# What building tandem needs: faiss is compiled from source (cmake, a C++ compiler, BLAS/LAPACK);
# librdkafka too (its cmake build includes curl's headers even with curl off, and needs make and
# pkg-config); the etcd client a protoc (ensure_protoc).
ensure_build_deps() {
  ensure_rust
  ensure_apt cmake make g++ pkg-config libopenblas-dev libcurl4-openssl-dev
  ensure_protoc
}

# python3 with venv, for the tools and test clients installed from PyPI into venvs.
ensure_python() {
  if ! command -v python3 >/dev/null 2>&1; then
    ensure_apt python3 python3-venv
  fi
  python3 -c 'import ensurepip' >/dev/null 2>&1 || ensure_apt python3-venv
}

# A real etcd for the discovery (and arbiter) tests: Debian's etcd-server provides /usr/bin/etcd.
# The tests start their own on free ports; the package's own service, if it starts, is not used.
ensure_etcd() {
  [ -x /usr/bin/etcd ] || ensure_apt etcd-server
}
