//! Typed systemd unit files: rendering, and parsing back the subset we render.
//!
//! The unit file on disk is the single source of truth for both backends:
//! systemd reads it itself, and the process backend parses it with
//! [`parse_unit`]. Paths inside a [`Unit`] are host paths exactly as the
//! service manager sees them, so callers build them with
//! [`HostPaths::host`] (under `--root` they then point into the root).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE};
use crate::paths::HostPaths;

use super::ServicesError;

/// Where unit files live on the host.
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// First line of every unit file the agent renders: how `status` and `reset`
/// tell the agent's units from the host's, whichever phase installed them.
pub const AGENT_HEADER: &str = "# Written by cluster-agent; local edits are overwritten.";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unit {
    /// File name, e.g. `etcd.service`.
    pub name: String,
    pub description: String,
    pub after: Vec<String>,
    pub wants: Vec<String>,
    pub requires: Vec<String>,
    pub service: ServiceSection,
    pub install: InstallSection,
    /// Settings only systemd acts on — sandboxing, start-rate limits, exit
    /// statuses that stop restarts — as `(section, key, value)` in file
    /// order. The process backend runs the same ExecStart without them: it
    /// can neither sandbox nor restart, and says so in docs/architecture.md.
    pub systemd_only: Vec<(String, String, String)>,
}

/// Keys [`Unit::systemd_only`] may hold: none of them changes what runs,
/// only how systemd confines, restarts or accounts for it.
const SYSTEMD_ONLY_KEYS: &[(&str, &str)] = &[
    ("Unit", "Documentation"),
    ("Unit", "ConditionPathExists"),
    ("Unit", "StartLimitIntervalSec"),
    ("Service", "NotifyAccess"),
    ("Service", "RestartPreventExitStatus"),
    ("Service", "NoNewPrivileges"),
    ("Service", "CapabilityBoundingSet"),
    ("Service", "ProtectSystem"),
    ("Service", "StateDirectory"),
    ("Service", "StateDirectoryMode"),
    ("Service", "ProtectHome"),
    ("Service", "PrivateTmp"),
    ("Service", "PrivateDevices"),
    ("Service", "PrivateMounts"),
    ("Service", "ReadWritePaths"),
    ("Service", "RuntimeDirectory"),
    ("Service", "RuntimeDirectoryPreserve"),
    ("Service", "ProtectKernelTunables"),
    ("Service", "ProtectKernelModules"),
    ("Service", "ProtectKernelLogs"),
    ("Service", "ProtectControlGroups"),
    ("Service", "ProtectClock"),
    ("Service", "ProtectHostname"),
    ("Service", "ProtectProc"),
    ("Service", "RestrictAddressFamilies"),
    ("Service", "RestrictNamespaces"),
    ("Service", "RestrictRealtime"),
    ("Service", "RestrictSUIDSGID"),
    ("Service", "LockPersonality"),
    ("Service", "MemoryDenyWriteExecute"),
    ("Service", "SystemCallArchitectures"),
    ("Service", "SystemCallFilter"),
    ("Service", "SystemCallErrorNumber"),
    ("Service", "UMask"),
    // containerd's unit (upstream's containerd.service): cgroup delegation,
    // which processes a stop signals, and limits/OOM score of the manager.
    // The process backend runs ExecStart without them: it stops only the
    // daemon's own process group (the shims run in their own), as
    // KillMode=process does.
    ("Service", "Delegate"),
    ("Service", "KillMode"),
    ("Service", "TasksMax"),
    ("Service", "LimitNPROC"),
    ("Service", "LimitCORE"),
    ("Service", "OOMScoreAdjust"),
];

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceSection {
    pub type_: ServiceType,
    /// argv; rendered so that systemd passes every element through verbatim
    /// (no `$VAR` or `%` specifier expansion).
    pub exec_start: Vec<String>,
    pub environment: BTreeMap<String, String>,
    pub environment_file: Option<EnvironmentFile>,
    pub working_directory: Option<PathBuf>,
    pub restart: Option<RestartPolicy>,
    pub restart_sec: Option<Duration>,
    pub timeout_start_sec: Option<Duration>,
    pub timeout_stop_sec: Option<Duration>,
    pub limit_nofile: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstallSection {
    pub wanted_by: Vec<String>,
}

/// `EnvironmentFile=`. `vars` is what [`install_unit`] writes; the parser
/// leaves it empty (read the file with [`read_env_file`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvironmentFile {
    pub path: PathBuf,
    /// `-` prefix: a missing file is not an error. Such a file is the
    /// operator's (e.g. Debian's `/etc/default/ceph` for `CEPH_ARGS`): the
    /// agent never writes it, and `vars` stays empty.
    pub optional: bool,
    pub vars: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    Simple,
    Exec,
    Notify,
    Oneshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
}

impl ServiceType {
    fn as_str(self) -> &'static str {
        match self {
            ServiceType::Simple => "simple",
            ServiceType::Exec => "exec",
            ServiceType::Notify => "notify",
            ServiceType::Oneshot => "oneshot",
        }
    }
    fn parse(s: &str) -> Option<ServiceType> {
        [
            ServiceType::Simple,
            ServiceType::Exec,
            ServiceType::Notify,
            ServiceType::Oneshot,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

impl RestartPolicy {
    fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
    fn parse(s: &str) -> Option<RestartPolicy> {
        [
            RestartPolicy::No,
            RestartPolicy::OnFailure,
            RestartPolicy::Always,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// Checks that `name` is a plain service unit file name (no path tricks).
pub fn validate_unit_name(name: &str) -> Result<(), ServicesError> {
    let ok = name.len() > ".service".len()
        && name.ends_with(".service")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ServicesError::InvalidUnit {
            unit: name.to_string(),
            reason: "the name must be like `etcd.service` (letters, digits, `:-_.@`)".into(),
        })
    }
}

/// `<root>/etc/systemd/system/<name>`.
pub fn unit_path(paths: &HostPaths, name: &str) -> PathBuf {
    paths.host(UNIT_DIR).join(name)
}

impl Unit {
    /// Unit-file text. Fails on values systemd could not represent
    /// (newlines in single-line settings, a relative ExecStart).
    pub fn render(&self) -> Result<String, ServicesError> {
        self.validate()?;
        let s = &self.service;
        let mut out = format!("{AGENT_HEADER}\n[Unit]\n");
        line(&mut out, "Description", &spec_escape(&self.description));
        list(&mut out, "After", &self.after);
        list(&mut out, "Wants", &self.wants);
        list(&mut out, "Requires", &self.requires);
        self.render_systemd_only(&mut out, "Unit");
        out.push_str("\n[Service]\n");
        line(&mut out, "Type", s.type_.as_str());
        let argv: Vec<String> = s.exec_start.iter().map(|a| quote_exec_arg(a)).collect();
        line(&mut out, "ExecStart", &argv.join(" "));
        for (k, v) in &s.environment {
            line(
                &mut out,
                "Environment",
                &quote_word(&spec_escape(&format!("{k}={v}"))),
            );
        }
        if let Some(f) = &s.environment_file {
            let dash = if f.optional { "-" } else { "" };
            line(
                &mut out,
                "EnvironmentFile",
                &format!("{dash}{}", spec_escape(&f.path.to_string_lossy())),
            );
        }
        if let Some(d) = &s.working_directory {
            line(
                &mut out,
                "WorkingDirectory",
                &spec_escape(&d.to_string_lossy()),
            );
        }
        if let Some(r) = s.restart {
            line(&mut out, "Restart", r.as_str());
        }
        let durations = [
            ("RestartSec", s.restart_sec),
            ("TimeoutStartSec", s.timeout_start_sec),
            ("TimeoutStopSec", s.timeout_stop_sec),
        ];
        for (key, d) in durations {
            if let Some(d) = d {
                line(&mut out, key, &render_duration(d));
            }
        }
        if let Some(n) = s.limit_nofile {
            line(&mut out, "LimitNOFILE", &n.to_string());
        }
        self.render_systemd_only(&mut out, "Service");
        if !self.install.wanted_by.is_empty() {
            out.push_str("\n[Install]\n");
            list(&mut out, "WantedBy", &self.install.wanted_by);
        }
        Ok(out)
    }

    fn render_systemd_only(&self, out: &mut String, section: &str) {
        for (_, key, value) in self.systemd_only.iter().filter(|(s, _, _)| s == section) {
            line(out, key, value);
        }
    }

    fn validate(&self) -> Result<(), ServicesError> {
        validate_unit_name(&self.name)?;
        let invalid = |reason: String| ServicesError::InvalidUnit {
            unit: self.name.clone(),
            reason,
        };
        let s = &self.service;
        match s.exec_start.first() {
            Some(p) if p.starts_with('/') => {}
            _ => return Err(invalid("ExecStart needs an absolute program path".into())),
        }
        let mut single_line: Vec<(&str, String)> = vec![("Description", self.description.clone())];
        if let Some(f) = &s.environment_file {
            if f.optional && !f.vars.is_empty() {
                return Err(invalid(
                    "an optional EnvironmentFile is the operator's; the agent writes no variables into it"
                        .into(),
                ));
            }
            single_line.push(("EnvironmentFile", f.path.to_string_lossy().into_owned()));
        }
        if let Some(d) = &s.working_directory {
            single_line.push(("WorkingDirectory", d.to_string_lossy().into_owned()));
        }
        for (key, value) in single_line {
            if value.contains('\n') {
                return Err(invalid(format!("{key} must not contain a newline")));
            }
        }
        let names = s
            .environment
            .keys()
            .chain(s.environment_file.iter().flat_map(|f| f.vars.keys()));
        for name in names {
            if !env_name_is_valid(name) {
                return Err(invalid(format!(
                    "`{name}` is not a valid environment variable name"
                )));
            }
        }
        for dep in self
            .after
            .iter()
            .chain(&self.wants)
            .chain(&self.requires)
            .chain(&self.install.wanted_by)
        {
            if dep.is_empty() || dep.contains(char::is_whitespace) {
                return Err(invalid(format!("dependency `{dep}` is not a unit name")));
            }
        }
        Ok(())
    }
}

fn line(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "{key}={value}");
}

fn list(out: &mut String, key: &str, values: &[String]) {
    if !values.is_empty() {
        line(out, key, &values.join(" "));
    }
}

/// systemd expands `%x` specifiers in most settings; `%%` is a literal `%`.
fn spec_escape(s: &str) -> String {
    s.replace('%', "%%")
}

fn spec_unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('%') => out.push('%'),
                other => {
                    return Err(format!(
                        "specifier `%{}` is not supported (only `%%`)",
                        other.map(String::from).unwrap_or_default()
                    ));
                }
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// One ExecStart word: `%` and `$` doubled so systemd expands neither, then
/// quoted as a word.
fn quote_exec_arg(arg: &str) -> String {
    quote_word(&spec_escape(arg).replace('$', "$$"))
}

/// Double-quotes a word when needed, with C-style escapes that systemd's
/// word splitter (`extract_first_word` with `EXTRACT_CUNESCAPE`) undoes.
fn quote_word(word: &str) -> String {
    let needs_quotes = word.is_empty()
        || word
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'\\;".contains(c));
    if !needs_quotes {
        return word.to_string();
    }
    let mut out = String::from("\"");
    for c in word.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Splits a setting value into words the way systemd does for ExecStart= and
/// Environment=: whitespace separates, quotes group, C escapes are undone.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(words);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        while let Some(c) = chars.next() {
            match (c, quote) {
                ('\\', _) => word.push(unescape_c(&mut chars)?),
                (q, None) if q == '"' || q == '\'' => quote = Some(q),
                (q, Some(open)) if q == open => quote = None,
                (c, None) if c.is_whitespace() => break,
                (c, _) => word.push(c),
            }
        }
        if quote.is_some() {
            return Err("unterminated quote".into());
        }
        words.push(word);
    }
}

fn unescape_c(chars: &mut impl Iterator<Item = char>) -> Result<char, String> {
    let c = chars.next().ok_or("trailing backslash")?;
    Ok(match c {
        'n' => '\n',
        't' => '\t',
        'r' => '\r',
        's' => ' ',
        'x' => {
            let hex: String = chars.take(2).collect();
            u8::from_str_radix(&hex, 16)
                .map(char::from)
                .map_err(|_| format!("bad escape `\\x{hex}`"))?
        }
        '\\' | '"' | '\'' => c,
        other => return Err(format!("unsupported escape `\\{other}`")),
    })
}

fn render_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    match unit {
        "" | "s" | "sec" => Some(Duration::from_secs(n)),
        "ms" | "msec" => Some(Duration::from_millis(n)),
        "min" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

fn env_name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses unit-file text of the subset [`Unit::render`] produces. Keys
/// outside that subset are an error rather than silently ignored: the process
/// backend would otherwise run something different from what systemd runs.
pub fn parse_unit(name: &str, text: &str, source: &Path) -> Result<Unit, ServicesError> {
    let mut unit = Unit {
        name: name.to_string(),
        ..Unit::default()
    };
    let mut section = String::new();
    for (index, raw) in text.lines().enumerate() {
        let err = |message: String| ServicesError::Parse {
            path: source.to_path_buf(),
            line: index + 1,
            message,
        };
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = l
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| err(format!("expected `Key=Value`, found `{l}`")))?;
        let value = spec_unescape(value).map_err(err)?;
        let s = &mut unit.service;
        match (section.as_str(), key) {
            ("Unit", "Description") => unit.description = value,
            ("Unit", "After") => set_list(&mut unit.after, &value),
            ("Unit", "Wants") => set_list(&mut unit.wants, &value),
            ("Unit", "Requires") => set_list(&mut unit.requires, &value),
            ("Install", "WantedBy") => set_list(&mut unit.install.wanted_by, &value),
            ("Service", "Type") => {
                s.type_ = ServiceType::parse(&value)
                    .ok_or_else(|| err(format!("unsupported Type={value}")))?
            }
            ("Service", "ExecStart") => {
                s.exec_start = split_words(&value)
                    .and_then(|words| words.iter().map(|w| unescape_dollar(w)).collect())
                    .map_err(err)?
            }
            ("Service", "Environment") => {
                for word in split_words(&value).map_err(err)? {
                    let (k, v) = word
                        .split_once('=')
                        .filter(|(k, _)| env_name_is_valid(k))
                        .ok_or_else(|| err(format!("`{word}` is not KEY=VALUE")))?;
                    s.environment.insert(k.to_string(), v.to_string());
                }
            }
            ("Service", "EnvironmentFile") => {
                let (optional, path) = match value.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, value.as_str()),
                };
                s.environment_file = Some(EnvironmentFile {
                    path: PathBuf::from(path),
                    optional,
                    vars: BTreeMap::new(),
                });
            }
            ("Service", "WorkingDirectory") => s.working_directory = Some(PathBuf::from(value)),
            ("Service", "Restart") => {
                s.restart = Some(
                    RestartPolicy::parse(&value)
                        .ok_or_else(|| err(format!("unsupported Restart={value}")))?,
                )
            }
            ("Service", "RestartSec" | "TimeoutStartSec" | "TimeoutStopSec") => {
                let d =
                    parse_duration(&value).ok_or_else(|| err(format!("bad duration `{value}`")))?;
                let slot = match key {
                    "RestartSec" => &mut s.restart_sec,
                    "TimeoutStartSec" => &mut s.timeout_start_sec,
                    _ => &mut s.timeout_stop_sec,
                };
                *slot = Some(d);
            }
            ("Service", "LimitNOFILE") => {
                s.limit_nofile = Some(
                    value
                        .parse()
                        .map_err(|_| err(format!("bad LimitNOFILE `{value}`")))?,
                )
            }
            (sec, k) if SYSTEMD_ONLY_KEYS.contains(&(sec, k)) => unit.systemd_only.push((
                section.clone(),
                key.to_string(),
                // Verbatim: these are systemd's to interpret.
                l.split_once('=')
                    .map(|(_, v)| v.trim())
                    .unwrap_or_default()
                    .to_string(),
            )),
            _ => {
                return Err(err(format!(
                    "`{key}=` in [{section}] is not supported by cluster-agent"
                )));
            }
        }
    }
    if unit.service.exec_start.is_empty() {
        return Err(ServicesError::Parse {
            path: source.to_path_buf(),
            line: 0,
            message: "no ExecStart=".into(),
        });
    }
    Ok(unit)
}

/// An empty assignment resets a list setting, as in systemd.
fn set_list(list: &mut Vec<String>, value: &str) {
    if value.is_empty() {
        list.clear();
    } else {
        list.extend(value.split_whitespace().map(str::to_string));
    }
}

/// `$$` is a literal `$`; `$VAR` expansion is not part of what we render.
fn unescape_dollar(word: &str) -> Result<String, String> {
    let mut out = String::with_capacity(word.len());
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        if c == '$' && chars.next() != Some('$') {
            return Err(format!(
                "variable expansion in `{word}` is not supported (write `$$`)"
            ));
        }
        out.push(c);
    }
    Ok(out)
}

/// Renders an environment file that systemd's `EnvironmentFile=` parser reads
/// back verbatim.
pub fn render_env_file(vars: &BTreeMap<String, String>) -> String {
    let mut out = String::from("# Written by cluster-agent.\n");
    for (k, v) in vars {
        let mut escaped = String::with_capacity(v.len());
        for c in v.chars() {
            if "\"\\`$".contains(c) {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        let _ = writeln!(out, "{k}=\"{escaped}\"");
    }
    out
}

/// Parses systemd's `EnvironmentFile=` format: `KEY=VALUE` lines, `#`/`;`
/// comments, single quotes (literal), double quotes (backslash escapes
/// ``"\`$`` and line continuation), unquoted values with trailing whitespace
/// trimmed and backslash-newline continuation.
pub fn parse_env_file(
    text: &str,
    source: &Path,
) -> Result<BTreeMap<String, String>, ServicesError> {
    let mut vars = BTreeMap::new();
    let mut line_no = 1;
    let mut chars = text.chars().peekable();
    let err = |line: usize, message: String| ServicesError::Parse {
        path: source.to_path_buf(),
        line,
        message,
    };
    while chars.peek().is_some() {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            if chars.next() == Some('\n') {
                line_no += 1;
            }
        }
        match chars.peek() {
            None => break,
            Some('#' | ';') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line_no += 1;
                        break;
                    }
                }
                continue;
            }
            _ => {}
        }
        let start_line = line_no;
        let mut key = String::new();
        loop {
            match chars.next() {
                Some('=') => break,
                Some('\n') | None => {
                    return Err(err(start_line, format!("`{}` has no `=`", key.trim())));
                }
                Some(c) => key.push(c),
            }
        }
        let key = key.trim_end().to_string();
        if !env_name_is_valid(&key) {
            return Err(err(
                start_line,
                format!("`{key}` is not a valid variable name"),
            ));
        }
        let mut value = String::new();
        // Length of `value` up to its last quoted or escaped character, which
        // trimming of trailing whitespace must not cut into.
        let mut keep = 0;
        let mut at_start = true;
        while let Some(c) = chars.next() {
            match c {
                '\n' => {
                    line_no += 1;
                    break;
                }
                c if at_start && c.is_whitespace() => {}
                '\'' => {
                    loop {
                        match chars.next() {
                            Some('\'') => break,
                            Some(c) => {
                                line_no += usize::from(c == '\n');
                                value.push(c)
                            }
                            None => {
                                return Err(err(start_line, "unterminated single quote".into()));
                            }
                        }
                    }
                    keep = value.len();
                }
                '"' => {
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some('\n') => line_no += 1,
                                Some(c) if "\"\\`$".contains(c) => value.push(c),
                                Some(c) => {
                                    value.push('\\');
                                    value.push(c);
                                }
                                None => {
                                    return Err(err(
                                        start_line,
                                        "unterminated double quote".into(),
                                    ));
                                }
                            },
                            Some(c) => {
                                line_no += usize::from(c == '\n');
                                value.push(c)
                            }
                            None => {
                                return Err(err(start_line, "unterminated double quote".into()));
                            }
                        }
                    }
                    keep = value.len();
                }
                '\\' => match chars.next() {
                    Some('\n') => line_no += 1,
                    Some(c) => {
                        value.push(c);
                        keep = value.len();
                    }
                    None => {}
                },
                c => value.push(c),
            }
            at_start = false;
        }
        let trimmed_len = value.trim_end().len().max(keep);
        value.truncate(trimmed_len);
        vars.insert(key, value);
    }
    Ok(vars)
}

/// Reads an environment file; a missing optional file is empty.
pub fn read_env_file(file: &EnvironmentFile) -> Result<BTreeMap<String, String>, ServicesError> {
    match fsutil::read_optional(&file.path) {
        Ok(Some(bytes)) => parse_env_file(&String::from_utf8_lossy(&bytes), &file.path),
        Ok(None) if file.optional => Ok(BTreeMap::new()),
        Ok(None) => Err(ServicesError::Io {
            what: "read the EnvironmentFile (it is not optional)".into(),
            path: file.path.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        }),
        Err(source) => Err(ServicesError::Io {
            what: "read the EnvironmentFile".into(),
            path: file.path.clone(),
            source,
        }),
    }
}

/// Writes the unit to `<root>/etc/systemd/system/<name>` and its environment
/// file (mode 0600: it may hold secrets), each only if its content changed.
/// Returns whether anything changed, i.e. whether a daemon-reload (and a
/// restart of a running service) is due.
pub fn install_unit(paths: &HostPaths, unit: &Unit) -> Result<bool, ServicesError> {
    let mut changed = false;
    if let Some(f) = unit
        .service
        .environment_file
        .as_ref()
        .filter(|f| !f.optional)
    {
        changed |= write_if_changed(&f.path, render_env_file(&f.vars).as_bytes(), SECRET_MODE)?;
    }
    let path = unit_path(paths, &unit.name);
    changed |= write_if_changed(&path, unit.render()?.as_bytes(), PUBLIC_MODE)?;
    Ok(changed)
}

/// True when `unit` (and its environment file) are on disk exactly as
/// [`install_unit`] would write them.
pub fn unit_installed(paths: &HostPaths, unit: &Unit) -> Result<bool, ServicesError> {
    if let Some(f) = &unit.service.environment_file
        && !f.optional
        && !file_matches(&f.path, render_env_file(&f.vars).as_bytes())?
    {
        return Ok(false);
    }
    file_matches(&unit_path(paths, &unit.name), unit.render()?.as_bytes())
}

/// True when every `WantedBy=` target has the `.wants/` link that enabling
/// creates (both backends, and `systemctl enable`, make the same links).
pub fn unit_enabled(paths: &HostPaths, unit: &Unit) -> bool {
    unit.install.wanted_by.iter().all(|target| {
        wants_link(paths, target, &unit.name)
            .symlink_metadata()
            .is_ok()
    })
}

fn wants_link(paths: &HostPaths, target: &str, unit: &str) -> PathBuf {
    paths
        .host(UNIT_DIR)
        .join(format!("{target}.wants"))
        .join(unit)
}

/// Every unit the agent installed under `<root>/etc/systemd/system` (its
/// files start with [`AGENT_HEADER`]), parsed back, sorted by name. Units a
/// later phase adds are found here without `status` or `reset` knowing them.
pub fn agent_units(paths: &HostPaths) -> Result<Vec<Unit>, ServicesError> {
    let dir = paths.host(UNIT_DIR);
    let io = |what: &str, path: &Path| {
        let (what, path) = (what.to_string(), path.to_path_buf());
        move |source| ServicesError::Io { what, path, source }
    };
    let entries = match std::fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.map_err(io("list unit files", &dir))?,
    };
    let mut units = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("list unit files", &dir))?;
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(io("read the unit file", &path))?;
        if text.lines().next() != Some(AGENT_HEADER) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        units.push(parse_unit(&name, &text, &path)?);
    }
    units.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(units)
}

/// The `<target>.wants/<unit>` links that enable `unit` and exist now.
pub fn enable_links(paths: &HostPaths, unit: &Unit) -> Vec<PathBuf> {
    unit.install
        .wanted_by
        .iter()
        .map(|target| wants_link(paths, target, &unit.name))
        .filter(|link| link.symlink_metadata().is_ok())
        .collect()
}

fn file_matches(path: &Path, contents: &[u8]) -> Result<bool, ServicesError> {
    let current = fsutil::read_optional(path).map_err(|source| ServicesError::Io {
        what: "read the current file".into(),
        path: path.to_path_buf(),
        source,
    })?;
    Ok(current.as_deref() == Some(contents))
}

fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool, ServicesError> {
    if file_matches(path, contents)? {
        return Ok(false);
    }
    fsutil::write_atomic(path, contents, mode)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Unit {
        Unit {
            name: "demo.service".into(),
            description: "Demo 100% test".into(),
            after: vec!["network-online.target".into()],
            wants: vec!["network-online.target".into()],
            requires: vec![],
            service: ServiceSection {
                type_: ServiceType::Notify,
                exec_start: vec![
                    "/bin/sleep".into(),
                    "with space".into(),
                    "quote\"and\\back".into(),
                    "$HOME and 50%".into(),
                    "".into(),
                    "semi;colon".into(),
                ],
                environment: BTreeMap::from([
                    ("A".into(), "b c".into()),
                    ("PCT".into(), "100%".into()),
                    ("Q".into(), "say \"hi\"".into()),
                ]),
                environment_file: Some(EnvironmentFile {
                    path: "/etc/demo.env".into(),
                    optional: true,
                    vars: BTreeMap::new(),
                }),
                working_directory: Some("/var/lib/demo".into()),
                restart: Some(RestartPolicy::OnFailure),
                restart_sec: Some(Duration::from_secs(5)),
                timeout_start_sec: Some(Duration::from_millis(1500)),
                timeout_stop_sec: Some(Duration::from_secs(20)),
                limit_nofile: Some(65536),
            },
            install: InstallSection {
                wanted_by: vec!["multi-user.target".into()],
            },
            systemd_only: vec![
                ("Unit".into(), "StartLimitIntervalSec".into(), "0".into()),
                (
                    "Service".into(),
                    "SystemCallFilter".into(),
                    "@system-service".into(),
                ),
                (
                    "Service".into(),
                    "SystemCallFilter".into(),
                    "~@privileged".into(),
                ),
            ],
        }
    }

    #[test]
    fn render_then_parse_round_trips() {
        let unit = sample();
        let text = unit.render().unwrap();
        let parsed = parse_unit("demo.service", &text, Path::new("demo.service")).unwrap();
        assert_eq!(parsed, unit, "{text}");
    }

    #[test]
    fn exec_args_are_quoted_per_systemd_rules() {
        let text = sample().render().unwrap();
        assert!(
            text.contains(r#"ExecStart=/bin/sleep "with space" "quote\"and\\back" "$$HOME and 50%%" "" "semi;colon""#),
            "{text}"
        );
        assert!(text.contains("Environment=PCT=100%%\n"), "{text}");
    }

    #[test]
    fn parser_rejects_what_we_do_not_render() {
        let bad = [
            "[Service]\nExecStart=/bin/true\nExecStartPre=/bin/false\n",
            "[Service]\nExecStart=/bin/echo $HOME\n",
            "[Service]\nExecStart=/bin/echo %n\n",
            "[Service]\nExecStart=/bin/echo \"open\n",
            "[Service]\nType=forking\nExecStart=/bin/true\n",
            "[Unit]\nDescription=x\n",
        ];
        for text in bad {
            let e = parse_unit("x.service", text, Path::new("x.service")).unwrap_err();
            assert!(matches!(e, ServicesError::Parse { .. }), "{text}: {e}");
        }
    }

    #[test]
    fn render_rejects_unrepresentable_units() {
        let mut u = sample();
        u.service.exec_start = vec!["sleep".into()];
        assert!(u.render().is_err());
        let mut u = sample();
        u.description = "two\nlines".into();
        assert!(u.render().is_err());
        let mut u = sample();
        u.name = "../evil.service".into();
        assert!(u.render().is_err());
    }

    #[test]
    fn env_file_parses_systemd_syntax() {
        let text = "# comment\n; also comment\n  A=plain value   \nB=\"double \\\"q\\\" \\$x\"\nC='single $x \\n'\nD=\"multi\\\nline\"\nE=esc\\ aped\\\ncontinued\nEMPTY=\n F = spaced\n";
        let vars = parse_env_file(text, Path::new("t.env")).unwrap();
        let want: BTreeMap<String, String> = [
            ("A", "plain value"),
            ("B", "double \"q\" $x"),
            ("C", "single $x \\n"),
            ("D", "multiline"),
            ("E", "esc apedcontinued"),
            ("EMPTY", ""),
            ("F", "spaced"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(vars, want);
    }

    #[test]
    fn env_file_round_trips_and_reports_lines() {
        let vars: BTreeMap<String, String> = [("K", "a \"b\" \\ $c `d`\nnext"), ("Z", " padded ")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let back = parse_env_file(&render_env_file(&vars), Path::new("t.env")).unwrap();
        assert_eq!(back, vars);
        let e = parse_env_file("A=1\nnot a line\n", Path::new("t.env")).unwrap_err();
        assert!(matches!(e, ServicesError::Parse { line: 2, .. }), "{e}");
    }

    #[test]
    fn install_reports_changes_only_when_content_differs() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        let mut unit = sample();
        unit.service.environment_file = Some(EnvironmentFile {
            path: paths.host("/etc/demo.env"),
            optional: false,
            vars: BTreeMap::from([("X".into(), "1".into())]),
        });
        assert!(install_unit(&paths, &unit).unwrap());
        assert!(!install_unit(&paths, &unit).unwrap());
        unit.service
            .environment_file
            .as_mut()
            .unwrap()
            .vars
            .insert("X".into(), "2".into());
        assert!(install_unit(&paths, &unit).unwrap());
        let on_disk = std::fs::read_to_string(unit_path(&paths, "demo.service")).unwrap();
        assert_eq!(on_disk, unit.render().unwrap());
    }

    /// `systemd-analyze verify <file>` is the invocation that works here;
    /// `--root=` needs a full tree with sysinit.target. verify also checks
    /// that the ExecStart binary exists, hence /bin/sleep.
    #[test]
    fn rendered_unit_passes_systemd_analyze_verify() {
        let analyze = crate::test_tools::require_tool("systemd-analyze", "systemd");
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        let mut unit = sample();
        unit.service.exec_start = vec!["/bin/sleep".into(), "1000".into()];
        unit.service.environment_file.as_mut().unwrap().path = paths.host("/etc/demo.env");
        install_unit(&paths, &unit).unwrap();
        let out = std::process::Command::new(analyze)
            .arg("verify")
            .arg(unit_path(&paths, "demo.service"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "verify failed: {stderr}"
        );
    }

    #[test]
    fn agent_units_are_told_from_the_hosts_by_their_header() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        assert!(agent_units(&paths).unwrap().is_empty());
        let mut unit = sample();
        unit.service.environment_file = None;
        install_unit(&paths, &unit).unwrap();
        std::fs::write(
            unit_path(&paths, "host.service"),
            "[Service]\nExecStart=/bin/true\n",
        )
        .unwrap();
        let found = agent_units(&paths).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "demo.service");
        assert!(enable_links(&paths, &found[0]).is_empty());
        let wants = paths.host(UNIT_DIR).join("multi-user.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        std::os::unix::fs::symlink(
            "/etc/systemd/system/demo.service",
            wants.join("demo.service"),
        )
        .unwrap();
        assert_eq!(
            enable_links(&paths, &found[0]),
            [wants.join("demo.service")]
        );
        assert!(unit_enabled(&paths, &found[0]));
    }
}
