# Shared by .ci/fresh-machine and .ci/containers (sourced, not run): the cached clean
# Debian root filesystems and the copy of this checkout that goes into them.
#
#   rootfs_tarball SUITE    build $cache/SUITE.tar once: debootstrap --variant=minbase
#                           with python3 and make only, from $mirror (deb.debian.org)
#   checkout_tar HEAD       write this checkout to stdout as a tar: the committed HEAD
#                           (git archive) when HEAD is true, else the work tree's tracked
#                           and untracked files (not ignored ones such as .venv)
#   host_ca_bundle          the host's CA bundle pip must trust, or nothing: on a network
#                           that inspects TLS, PIP_CERT (or SSL_CERT_FILE) names it
#
# Expects $cache and $mirror; needs root and debootstrap for rootfs_tarball.

stamp() { date +%s; }
log() { echo "$log_prefix: $*" | tee -a "$cache/times.log"; }

rootfs_tarball() {
    local suite=$1 tarball=$cache/$1.tar
    if [ ! -s "$tarball" ]; then
        if ! command -v debootstrap >/dev/null; then
            echo "$log_prefix: installing debootstrap (apt-get install debootstrap)"
            apt-get -o DPkg::Lock::Timeout=600 update -qq
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq debootstrap
        fi
        local tmp=$cache/$suite.build t0
        rm -rf "$tmp"
        t0=$(stamp)
        echo "$log_prefix: debootstrap $suite (minbase + python3 make) into $tmp"
        debootstrap --variant=minbase --include=python3,make "$suite" "$tmp" "$mirror" \
            > "$cache/$suite.debootstrap.log" 2>&1 \
            || { tail -20 "$cache/$suite.debootstrap.log" >&2; exit 1; }
        tar -C "$tmp" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
        rm -rf "$tmp"
        log "$suite: debootstrap took $(($(stamp) - t0)) s"
    fi
}

checkout_tar() {
    if [ "$1" = true ]; then
        git archive HEAD
    else
        git ls-files -z --cached --others --exclude-standard \
            | tar --null -T - --ignore-failed-read -cf - 2>/dev/null
    fi
}

host_ca_bundle() {
    local cert=${PIP_CERT:-${SSL_CERT_FILE:-}}
    [ -n "$cert" ] && [ -f "$cert" ] && echo "$cert"
    return 0
}
