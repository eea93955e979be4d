# Shared by scripts/container-proof and scripts/systemd-proof (sourced, not run).
# Checks count into one summary line; a Debian tree from debootstrap is cached as a tarball.

PROOF_CACHE=${RELAYD_PROOF_CACHE:-/var/cache/relayd-proof}
PROOF_PASSED=0
PROOF_FAILED=0
PROOF_START=$SECONDS
PROOF_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# say: progress and timings, on the original stderr even from inside a check's capture.
exec 3>&2
say() { printf '%s: %s\n' "$PROOF_NAME" "$*" >&3; }

# check DESCRIPTION COMMAND...: run it, count it, show its output when it fails.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        PROOF_PASSED=$((PROOF_PASSED + 1))
        printf 'ok    %s\n' "$what"
    else
        PROOF_FAILED=$((PROOF_FAILED + 1))
        printf 'FAIL  %s\n' "$what"
        printf '%s\n' "$out" | tail -n 15 | sed 's/^/      | /'
    fi
}

# expect TEXT COMMAND...: the command succeeds and its output contains TEXT.
expect() {
    local text=$1 out
    shift
    out=$("$@" 2>&1) || { printf '%s\n(exit %s)\n' "$out" "$?"; return 1; }
    grep -qF -- "$text" <<<"$out" || { printf 'no %q in:\n%s\n' "$text" "$out"; return 1; }
}

# expect_exit CODE TEXT COMMAND...: the command exits CODE and its output contains TEXT.
expect_exit() {
    local code=$1 text=$2 out rc=0
    shift 2
    out=$("$@" 2>&1) || rc=$?
    [ "$rc" = "$code" ] || { printf 'exit %s, wanted %s:\n%s\n' "$rc" "$code" "$out"; return 1; }
    grep -qF -- "$text" <<<"$out" || { printf 'no %q in:\n%s\n' "$text" "$out"; return 1; }
}

# poll SECONDS COMMAND...: retry until it succeeds or the deadline passes.
poll() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { "$@"; return 1; }
        sleep 0.5
    done
}

summary() {
    printf '%s: %d passed, %d failed in %d s\n' "$PROOF_NAME" "$PROOF_PASSED" "$PROOF_FAILED" \
        $((SECONDS - PROOF_START))
    [ "$PROOF_FAILED" -eq 0 ] && [ "$PROOF_PASSED" -gt 0 ]
}

need() {
    local missing=()
    for cmd in "$@"; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "missing ${missing[*]}: apt-get install -y docker.io debootstrap systemd-container"
    exit 2
}

# The Debian mirror apt uses here (debootstrap must not guess one the network may not reach).
debian_mirror() {
    python3 - <<'EOF'
import glob, re
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
    try:
        text = open(path).read()
    except OSError:
        continue
    for uri in re.findall(r"^\s*(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
        if "/debian" in uri and "security" not in uri:
            print(uri)
            raise SystemExit
raise SystemExit("no Debian mirror in /etc/apt/sources.list*")
EOF
}

# debian_tree DEST PACKAGES: a minimal Debian of the host's release with PACKAGES, from the
# cache when a tree of the same recipe was made before.
debian_tree() {
    local dest=$1 packages=$2 suite mirror key tarball
    suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
    mirror=$(debian_mirror)
    key=$(printf '%s\n' "$suite" "$mirror" "$packages" "minbase-1" | sha256sum | cut -c1-16)
    tarball=$PROOF_CACHE/debian-$suite-$key.tar
    mkdir -p "$dest" "$PROOF_CACHE"
    if [ ! -s "$tarball" ]; then
        say "debootstrap $suite from $mirror (once; cached as $tarball)"
        debootstrap --variant=minbase --include="$packages" "$suite" "$dest" "$mirror" \
            >"$dest.debootstrap.log" 2>&1 || { tail -n 20 "$dest.debootstrap.log" >&2; return 1; }
        rm -rf "$dest/var/cache/apt/archives/"*.deb "$dest/var/lib/apt/lists/"*
        tar -C "$dest" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    else
        tar -C "$dest" -xf "$tarball"
    fi
}

# trust_host TREE: the tree trusts the CAs this host trusts and uses the pip settings this
# host's pip uses (index, certificate, timeout), or pip inside it cannot reach the index.
trust_host() {
    local tree=$1
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$tree/etc/ssl/certs/ca-certificates.crt"
    python3 - "$tree/etc/pip.conf" <<'EOF'
import configparser, os, subprocess, sys
out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True)
conf = configparser.ConfigParser()
conf["global"] = {"cert": "/etc/ssl/certs/ca-certificates.crt"}
wanted = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "proxy")
pairs = [line.split("=", 1) for line in out.stdout.splitlines() if "=" in line]
pairs += [("global." + k[4:].lower().replace("_", "-"), repr(v)) for k, v in os.environ.items()
          if k.startswith("PIP_")]
for name, value in pairs:
    key = name.split(".", 1)[-1]
    value = value.strip().strip("'\"")
    # Local indexes and wheel directories of this host do not exist inside the tree.
    urls = [u for u in value.split() if not u.startswith(("file:", "/"))]
    if key in wanted and urls:
        conf["global"]["timeout" if key == "default-timeout" else key] = " ".join(urls)
with open(sys.argv[1], "w") as fh:
    conf.write(fh)
EOF
}

# make_pki DIR NAME...: a CA and a server certificate for NAMEs (DIR/ca.pem, server.{pem,key}).
make_pki() {
    local dir=$1 san="" name
    shift
    for name in "$@"; do # an address is an IP entry: a DNS entry never matches it
        if [[ $name =~ ^[0-9.]+$ ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
    done
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=relayd proof CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$1" -keyout "$dir/server.key" \
        -out "$dir/server.csr" >/dev/null 2>&1
    printf 'subjectAltName=%s\n' "${san%,}" >"$dir/san.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/san.ext" -out "$dir/server.pem" >/dev/null 2>&1
    chmod 0644 "$dir/server.key" "$dir/ca.pem" "$dir/server.pem"
}
