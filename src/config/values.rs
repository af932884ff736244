//! Parsers for single scalar values. Each returns the message that follows
//! `FILE:LINE:COL: FIELD: ` when the text is not acceptable.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

use super::{Endpoint, MacAddr, NodeRole};

pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 86_400);

pub fn ipv4(text: &str) -> Result<Ipv4Addr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IPv4 address"))
}

/// A network address: host bits set (10.244.0.1/16) is almost always a typo
/// for the network, so it is refused rather than silently truncated.
pub fn cidr(text: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 CIDR (expected e.g. 10.244.0.0/16)"))?;
    if net.addr() != net.network() {
        return Err(format!(
            "{text:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

pub fn mac(text: &str) -> Result<MacAddr, String> {
    MacAddr::parse(text)
        .ok_or_else(|| format!("{text:?} is not a MAC address (expected e.g. 52:54:00:12:34:56)"))
}

pub fn role(text: &str) -> Result<NodeRole, String> {
    const NAMES: &[&str] = &["control-plane", "master", "worker", "ceph-mon"];
    match text {
        "control-plane" | "master" => Ok(NodeRole::ControlPlane),
        "worker" => Ok(NodeRole::Worker),
        "ceph-mon" => Ok(NodeRole::CephMon),
        _ => Err(match super::raw::suggest(text, NAMES) {
            Some(best) => format!("unknown role {text:?}, did you mean `{best}`?"),
            None => format!(
                "unknown role {text:?}, expected one of: {}",
                NAMES.join(", ")
            ),
        }),
    }
}

/// An unsigned integer written as a plain YAML scalar. A quoted "6443" is a
/// string in YAML, and accepting it would hide type confusion elsewhere.
pub fn integer(text: &str, plain: bool) -> Result<u64, String> {
    if !plain {
        return Err(format!("expected an integer, got the string {text:?}"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) || text.is_empty() {
        return Err(format!("expected an integer, got {text:?}"));
    }
    text.parse().map_err(|_| format!("{text:?} is too large"))
}

pub fn port(text: &str, plain: bool) -> Result<u16, String> {
    match integer(text, plain)? {
        0 => Err("port must not be 0".into()),
        n => u16::try_from(n).map_err(|_| format!("port {n} is out of range (1-65535)")),
    }
}

/// `true` or `false`, unquoted (YAML 1.2's core schema: `yes`, `on` and a
/// quoted "true" are not booleans there, and a typo must not pass as one).
pub fn boolean(text: &str, plain: bool) -> Result<bool, String> {
    match (text, plain) {
        ("true", true) => Ok(true),
        ("false", true) => Ok(false),
        _ => Err(format!(
            "{text:?} is not a boolean (expected true or false, unquoted)"
        )),
    }
}

pub fn prefix_length(text: &str, plain: bool) -> Result<u8, String> {
    match integer(text, plain)? {
        n @ 1..=32 => Ok(n as u8),
        n => Err(format!("prefix length {n} is out of range (1-32)")),
    }
}

/// `30m`, `24h`, `7d`, `1h30m`: number+unit pairs, units d/h/m/s, each at
/// most once and largest first (so `1h30m` is fine, `30m1h` a typo).
/// A kubelet eviction threshold as the kubelet parses it
/// (`pkg/kubelet/eviction`): a percentage from 0% to 100% (0% turns the
/// signal off), or a positive quantity such as `100Mi` or `1000`.
pub fn eviction_threshold(text: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "{text:?} is not an eviction threshold (expected a percentage such as 10% or 0% \
             to turn the signal off, or a quantity such as 500Mi)"
        )
    };
    let decimal = |number: &str| -> Option<f64> {
        let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        (digits(whole) && digits(fraction))
            .then(|| number.parse().ok())
            .flatten()
    };
    if let Some(number) = text.strip_suffix('%') {
        let percent = decimal(number).ok_or_else(bad)?;
        if percent > 100.0 {
            return Err(format!("{text:?} is more than 100%"));
        }
        return Ok(text.to_owned());
    }
    const SUFFIXES: &[&str] = &[
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|suffix| text.strip_suffix(suffix))
        .unwrap_or(text);
    let amount = decimal(number).ok_or_else(bad)?;
    if amount == 0.0 {
        return Err(format!(
            "{text:?}: a quantity threshold must be positive (use 0% to turn the signal off)"
        ));
    }
    Ok(text.to_owned())
}

pub fn duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (expected e.g. 30m, 24h, 7d, 1h30m)");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut last_rank = usize::MAX;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let (number, tail) = rest.split_at(digits);
        let mut chars = tail.chars();
        let unit = chars.next().ok_or_else(bad)?;
        let (rank, seconds) = match unit {
            'd' => (3, 86_400),
            'h' => (2, 3_600),
            'm' => (1, 60),
            's' => (0, 1),
            _ => return Err(bad()),
        };
        if rank >= last_rank {
            return Err(bad());
        }
        last_rank = rank;
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| format!("{text:?} is longer than the maximum of 365d"))?;
        rest = chars.as_str();
    }
    let ttl = Duration::from_secs(total);
    if ttl.is_zero() {
        return Err("must be longer than 0".into());
    }
    if ttl > MAX_TOKEN_TTL {
        return Err(format!("{text:?} is longer than the maximum of 365d"));
    }
    Ok(ttl)
}

/// RFC 1123 label: what Kubernetes accepts as a node name, and safe as a
/// file name under nodes/.
pub fn dns_label(text: &str) -> Result<(), String> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a valid name (lower-case letters, digits and '-', at most 63 characters, \
             not starting or ending with '-')"
        ))
    }
}

/// A DNS name (dot-separated labels, any case), at most 253 characters.
pub fn dns_name(text: &str) -> Result<(), String> {
    let ok = !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{text:?} is not a valid DNS name"))
    }
}

/// `MAJOR.MINOR.PATCH`, as kubeadm's `kubernetesVersion` expects.
pub fn k8s_version(text: &str) -> Result<(), String> {
    let parts: Vec<&str> = text.split('.').collect();
    let ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not a Kubernetes version (expected MAJOR.MINOR.PATCH, e.g. \"1.31.0\")"
        ))
    }
}

/// An OCI image reference, as distribution's `reference` grammar (which
/// containerd parses with) has it: `[domain/]path[:tag][@digest]`. `domain`
/// is `host[:port]` and is told from a path by a `.` or `:` or being
/// `localhost`; path components are lower-case alphanumerics joined by
/// `.`, `_`, `__` or dashes; a tag is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`;
/// a digest `algorithm:hex` with at least 32 hex digits. IPv6 hosts are not
/// accepted (the cluster is IPv4 only).
pub fn image_reference(text: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!(
            "{text:?} is not an image reference ({why}; expected e.g. \
             registry.k8s.io/pause:3.10.1)"
        )
    };
    let (name_tag, digest) = match text.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (text, None),
    };
    if let Some(d) = digest {
        let (algorithm, hex) = d.split_once(':').ok_or_else(|| bad("digest without `:`"))?;
        let algorithm_ok = algorithm.split(['+', '.', '-', '_']).all(|c| {
            c.starts_with(|ch: char| ch.is_ascii_alphabetic())
                && c.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("malformed digest"));
        }
    }
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let ok = tag.len() <= 128
            && tag.bytes().next().is_some_and(word)
            && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
        if !ok {
            return Err(bad("malformed tag"));
        }
    }
    if name.is_empty() {
        return Err(bad("no image name"));
    }
    if name.len() > 255 {
        return Err(bad("the name is longer than 255 characters"));
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    if components.len() > 1
        && (first.contains(['.', ':'])
            || first == "localhost"
            || first.bytes().any(|b| b.is_ascii_uppercase()))
    {
        let (host, port) = match first.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (first, None),
        };
        let host_ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !host_ok || !port_ok {
            return Err(bad("malformed registry host"));
        }
        components.remove(0);
    }
    for component in components {
        if !path_component(component) {
            return Err(bad(
                "path components are lower-case letters and digits joined by `.`, `_`, `__` or `-`",
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+` runs joined by one `.`, one `_`, `__`, or any run of `-`.
fn path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if !bytes.first().is_some_and(|b| alnum(*b)) || !bytes.last().is_some_and(|b| alnum(*b)) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &c[start..i];
        if !(matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-')) {
            return false;
        }
    }
    true
}

/// A manifest file relative to the config dir: `.yaml` or `.yml`, no
/// absolute path, no `..`, and not under `manifests/` (whose files are
/// applied anyway).
pub fn manifest_path(text: &str) -> Result<std::path::PathBuf, String> {
    use std::path::{Component, Path};
    let path = Path::new(text);
    if !(text.ends_with(".yaml") || text.ends_with(".yml")) {
        return Err(format!("{text:?} is not a .yaml or .yml file"));
    }
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "{text:?} must be a path inside the config dir, relative, without `..` (e.g. cni/calico.yaml)"
        ));
    }
    if path.starts_with(super::MANIFESTS_DIR) {
        return Err(format!(
            "{text:?} is under {}/, whose files are all applied as add-ons; put the CNI manifest elsewhere (e.g. cni/)",
            super::MANIFESTS_DIR
        ));
    }
    Ok(path.to_path_buf())
}

/// A file in `serve`'s assets directory: a relative path of plain
/// components (`flatcar/current/flatcar_production_pxe.vmlinuz`), nothing
/// that could leave the directory or that a URL would have to encode.
pub fn asset_path(text: &str) -> Result<String, String> {
    let plain = |c: &str| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._-+~".contains(ch))
    };
    if text.split('/').all(plain) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a file inside the assets directory: a relative path of letters, digits and . _ - + ~, without `..` (e.g. flatcar_production_pxe.vmlinuz)"
        ))
    }
}

/// `host` or `host:port`, host an IPv4 address or DNS name.
pub fn endpoint(text: &str, default_port: u16) -> Result<Endpoint, String> {
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, port_in_endpoint(text, port)?),
        None => (text, default_port),
    };
    if host.parse::<Ipv4Addr>().is_err() && dns_name(host).is_err() {
        return Err(format!(
            "{text:?} is not HOST[:PORT] with HOST an IPv4 address or DNS name"
        ));
    }
    Ok(Endpoint {
        host: host.to_owned(),
        port,
    })
}

fn port_in_endpoint(text: &str, port: &str) -> Result<u16, String> {
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?} has an invalid port (expected 1-65535)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_stay_inside_the_config_dir_and_out_of_manifests() {
        assert_eq!(
            manifest_path("cni/calico.yaml").unwrap(),
            std::path::PathBuf::from("cni/calico.yaml")
        );
        assert!(manifest_path("calico.yml").is_ok());
        for (text, why) in [
            ("/etc/calico.yaml", "must be a path inside"),
            ("cni/../../calico.yaml", "must be a path inside"),
            ("./calico.yaml", "must be a path inside"),
            ("calico.json", "not a .yaml or .yml"),
            ("manifests/calico.yaml", "whose files are all applied"),
        ] {
            let err = manifest_path(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn durations() {
        let d = |s| duration(s).map(|d| d.as_secs());
        assert_eq!(d("30m"), Ok(1_800));
        assert_eq!(d("24h"), Ok(86_400));
        assert_eq!(d("7d"), Ok(604_800));
        assert_eq!(d("1h30m"), Ok(5_400));
        assert_eq!(d("1d2h3m4s"), Ok(93_784));
        assert_eq!(d("365d"), Ok(31_536_000));
        assert!(d("366d").unwrap_err().contains("maximum of 365d"));
        assert!(d("99999999999999999999d").is_err());
        assert_eq!(d("0h"), Err("must be longer than 0".into()));
        for bad in ["", "24", "h", "30m1h", "1h1h", "1.5h", "24x", "-1h", "1 h"] {
            assert!(d(bad).unwrap_err().contains("not a duration"), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(cidr("10.244.0.0/16").unwrap().to_string(), "10.244.0.0/16");
        assert_eq!(
            cidr("10.244.0.1/16").unwrap_err(),
            "\"10.244.0.1/16\" has host bits set (did you mean 10.244.0.0/16?)"
        );
        assert!(cidr("10.244.0.0").is_err());
        assert!(cidr("10.244.0.0/33").is_err());
    }

    #[test]
    fn ports_and_integers() {
        assert_eq!(port("6443", true), Ok(6443));
        assert_eq!(port("0", true), Err("port must not be 0".into()));
        assert!(port("65536", true).is_err());
        assert!(port("6443", false).unwrap_err().contains("string"));
        assert!(port("-1", true).is_err());
        assert_eq!(prefix_length("24", true), Ok(24));
        assert!(prefix_length("33", true).is_err());
    }

    #[test]
    fn endpoints() {
        let e = endpoint("192.168.1.10:6443", 1).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("192.168.1.10", 6443));
        let e = endpoint("api.example.net", 6443).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("api.example.net", 6443));
        assert!(endpoint("1.2.3.4:0", 6443).is_err());
        assert!(endpoint("[::1]:6443", 6443).is_err());
        assert!(endpoint("", 6443).is_err());
    }

    #[test]
    fn names_and_roles() {
        assert!(dns_label("cp-1").is_ok());
        assert!(dns_label("Cp_1").is_err());
        assert!(dns_label("-a").is_err());
        assert!(dns_name("cp-1.example.net").is_ok());
        assert!(dns_name("a..b").is_err());
        assert_eq!(role("master"), Ok(NodeRole::ControlPlane));
        assert_eq!(role("worker"), Ok(NodeRole::Worker));
        assert_eq!(
            role("wroker").unwrap_err(),
            "unknown role \"wroker\", did you mean `worker`?"
        );
        assert!(k8s_version("1.31.0").is_ok());
        assert!(k8s_version("1.31").is_err());
    }

    #[test]
    fn image_references() {
        for good in [
            "registry.k8s.io/pause:3.10.1",
            "pause",
            "library/busybox:latest",
            "localhost:5000/team/pause:v1_x-2.0",
            "localhost/pause",
            "Registry.Example:443/a__b/c-d.e/f---g",
            "quay.io/x/y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "quay.io/x/y:1@sha256:0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(image_reference(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ":3.10",
            "registry.k8s.io/",
            "registry.k8s.io/Pause:3.10",
            "pause:",
            "pause:-1",
            "pause:3.10 ",
            "two words",
            "a..b/c",
            "reg.io/a..b",
            "reg.io/-a",
            "reg.io:x/a",
            "x/y@sha256:abc",
            "x/y@:0123456789abcdef0123456789abcdef",
            "[::1]:5000/pause",
        ] {
            assert!(
                image_reference(bad)
                    .unwrap_err()
                    .contains("is not an image reference"),
                "{bad:?}"
            );
        }
        assert!(image_reference(&format!("{}:1", "a".repeat(256))).is_err());
        assert!(image_reference(&format!("pause:{}", "1".repeat(129))).is_err());
    }
}
