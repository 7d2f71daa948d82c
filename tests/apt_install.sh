# Sourced by tests/install_browser.sh and tests/install_postgres.sh, which `make test` runs before
# any test: `apt_install NAMES TESTS PACKAGE...` installs Debian packages with apt-get as root (or
# with passwordless sudo). Where it cannot, it says so in one line and returns 0, and the tests that
# need them are skipped, except under CI=true, where it is an error (return 1).
apt_install() {
    local names=$1 tests=$2 as_root why
    shift 2
    if [ "$(id -u)" = 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        as_root=(none)
    fi
    if [ "${as_root[0]:-}" != none ] && command -v apt-get >/dev/null; then
        echo "make test: installing Debian's $names for $tests"
        if "${as_root[@]}" apt-get update -qq >/dev/null \
            && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; then
            return 0
        fi
        why="apt-get could not install $names"
    elif command -v apt-get >/dev/null; then
        why="no $names, and no root or passwordless sudo to apt-get them"
    else
        why="no $names, and no apt-get to install them"
    fi
    if [ "${CI:-}" = true ]; then
        echo "error: $why: CI runs $tests" >&2
        return 1
    fi
    echo "make test: $why: $tests will be skipped (install them to run it)"
}
