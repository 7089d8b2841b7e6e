# shellcheck shell=bash
# Sourced by vagrant/qemu/vm-test.sh and vagrant/chroot/chroot-test.sh: the
# Debian mirrors this machine's own apt configuration uses, so that no
# package host is written into the project.
#
#   host_apt_entries            "URI SUITE" for every enabled deb entry of
#                               /etc/apt/sources.list{,.d/*.list,.d/*.sources}
#   host_debian_mirror SUITE    the URI serving SUITE (e.g. bookworm)
#   host_security_mirror SUITE  the URI serving SUITE-security
#   host_apt_conf               apt settings to carry into a chroot/guest
#                               (Check-Valid-Until, Check-Date, proxies)
host_apt_entries() {
    local etc=${APT_ETC:-/etc/apt} f
    {
        for f in "$etc/sources.list" "$etc"/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            # deb [options] URI SUITE COMPONENTS...
            sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && NF >= 3 {print $2, $3}'
        done
        for f in "$etc"/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            # deb822 paragraphs: Types, URIs, Suites (space separated), Enabled
            awk '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && enabled !~ /^(no|false)$/) {
                        n = split(uris, u, " "); m = split(suites, s, " ")
                        for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) print u[i], s[j]
                    }
                    types = uris = suites = enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                {
                    key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
                    if (key == "types") types = $0
                    else if (key == "uris") uris = $0
                    else if (key == "suites") suites = $0
                    else if (key == "enabled") enabled = tolower($0)
                }
                END { flush() }' "$f"
        done
    } | sed 's:/*\( \):\1:'   # no trailing slash on the URI
}

host_debian_mirror() {
    host_apt_entries | awk -v s="$1" '$2 == s {print $1; exit}'
}

host_security_mirror() {
    host_apt_entries | awk -v s="$1-security" '$2 == s || $2 == s "/updates" {print $1; exit}'
}

host_apt_conf() {
    apt-config dump 2>/dev/null | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' || true
}
