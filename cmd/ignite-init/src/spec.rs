//! What the guest init runs: the image's configuration merged with the VM's overrides exactly as Docker
//! does, and the user named in it resolved against the guest's `/etc/passwd` and `/etc/group`.

use std::collections::BTreeMap;

use guest_api::config::GuestConfig;
use guest_api::image::ImageConfig;

/// `PATH` when neither the image nor the overrides set one (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The main process, before the user is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Program and arguments (never empty).
    pub argv: Vec<String>,
    /// Environment, sorted by name.
    pub env: BTreeMap<String, String>,
    /// Working directory (`/` when unset).
    pub working_dir: String,
    /// The user as written (`root` when unset).
    pub user: String,
}

/// A resolved user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (`/` when unknown).
    pub home: String,
}

/// The image configuration and overrides cannot produce a process.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Neither the image nor the overrides give a command.
    #[error("no command: the image has no entrypoint or cmd and the VM sets no command or args")]
    NoCommand,
    /// A named user is not in `/etc/passwd`.
    #[error("user {0:?} not found in /etc/passwd")]
    UnknownUser(String),
    /// A named group is not in `/etc/group`.
    #[error("group {0:?} not found in /etc/group")]
    UnknownGroup(String),
}

/// Merges the image configuration with the VM's overrides: `command` replaces the entrypoint and drops the
/// image's cmd, `args` replaces the cmd, `env` entries replace same-named image entries, `working_dir` and
/// `user` replace the image's. `PATH` defaults to [`DEFAULT_PATH`], `HOSTNAME` to the VM's hostname.
pub fn merge(image: &ImageConfig, vm: &GuestConfig) -> Result<ProcessSpec, SpecError> {
    let (entrypoint, cmd) = match (&vm.command, &vm.args) {
        (Some(command), Some(args)) => (command.clone(), args.clone()),
        (Some(command), None) => (command.clone(), Vec::new()),
        (None, Some(args)) => (image.entrypoint.clone(), args.clone()),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    if !vm.hostname.is_empty() {
        env.insert("HOSTNAME".into(), vm.hostname.clone());
    }
    for entry in &image.env {
        let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
        env.insert(name.into(), value.into());
    }
    env.extend(vm.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    Ok(ProcessSpec {
        argv,
        env,
        working_dir: non_empty(&vm.working_dir).or(non_empty(&image.working_dir)).unwrap_or_else(|| "/".into()),
        user: non_empty(&vm.user).or(non_empty(&image.user)).unwrap_or_else(|| "root".into()),
    })
}

/// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`, `name:gid`, `uid:group`) against the text of
/// `/etc/passwd` and `/etc/group` as runc does: a numeric uid absent from passwd gets gid 0 and home `/`;
/// a name must exist.
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<User, SpecError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entries: Vec<Vec<&str>> =
        passwd.lines().map(|l| l.split(':').collect()).filter(|f: &Vec<&str>| f.len() >= 6).collect();
    let numeric = user_part.parse::<u32>().ok();
    let entry = entries.iter().find(|f| match numeric {
        Some(uid) => f[2].parse() == Ok(uid),
        None => f[0] == user_part,
    });
    let mut resolved = match (entry, numeric) {
        (Some(f), _) => User {
            uid: f[2].parse().map_err(|_| SpecError::UnknownUser(user_part.into()))?,
            gid: f[3].parse().unwrap_or(0),
            home: f[5].to_string(),
        },
        (None, Some(uid)) => User { uid, gid: 0, home: "/".into() },
        (None, None) => return Err(SpecError::UnknownUser(user_part.into())),
    };
    if let Some(group_part) = group_part {
        resolved.gid = match group_part.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == group_part)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| SpecError::UnknownGroup(group_part.into()))?,
        };
    }
    if resolved.home.is_empty() {
        resolved.home = "/".into();
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into(), "--port=80".into()],
            env: vec!["FOO=image".into(), "PATH=/opt/bin".into(), "EMPTY".into()],
            working_dir: Some("/app".into()),
            user: Some("www".into()),
        }
    }

    fn argv(vm: GuestConfig) -> Vec<String> {
        merge(&image(), &vm).unwrap().argv
    }

    fn strings(s: &[&str]) -> Option<Vec<String>> {
        Some(s.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn command_and_args_merge_like_docker() {
        assert_eq!(argv(GuestConfig::default()), ["/entry", "serve", "--port=80"]);
        assert_eq!(argv(GuestConfig { args: strings(&["x"]), ..Default::default() }), ["/entry", "x"]);
        assert_eq!(argv(GuestConfig { command: strings(&["/bin/sh"]), ..Default::default() }), ["/bin/sh"]);
        let both = GuestConfig { command: strings(&["/bin/sh"]), args: strings(&["-c", "true"]), ..Default::default() };
        assert_eq!(argv(both), ["/bin/sh", "-c", "true"]);
    }

    #[test]
    fn empty_command_is_an_error() {
        let vm = GuestConfig { command: strings(&[]), ..Default::default() };
        assert_eq!(merge(&ImageConfig::default(), &GuestConfig::default()), Err(SpecError::NoCommand));
        assert_eq!(merge(&image(), &vm), Err(SpecError::NoCommand));
    }

    #[test]
    fn env_overrides_win_and_path_defaults() {
        let vm = GuestConfig {
            hostname: "h".into(),
            env: [("FOO".to_string(), "vm".to_string())].into(),
            ..Default::default()
        };
        let spec = merge(&image(), &vm).unwrap();
        assert_eq!(spec.env["FOO"], "vm");
        assert_eq!(spec.env["PATH"], "/opt/bin");
        assert_eq!(spec.env["EMPTY"], "");
        assert_eq!(spec.env["HOSTNAME"], "h");
        let bare = merge(&ImageConfig { cmd: vec!["x".into()], ..Default::default() }, &GuestConfig::default());
        assert_eq!(bare.unwrap().env["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn workdir_and_user_overrides() {
        let spec = merge(&image(), &GuestConfig::default()).unwrap();
        assert_eq!((spec.working_dir.as_str(), spec.user.as_str()), ("/app", "www"));
        let vm = GuestConfig { working_dir: Some("/tmp".into()), user: Some("0".into()), ..Default::default() };
        let spec = merge(&image(), &vm).unwrap();
        assert_eq!((spec.working_dir.as_str(), spec.user.as_str()), ("/tmp", "0"));
        let spec = merge(&ImageConfig { cmd: vec!["x".into()], ..Default::default() }, &GuestConfig::default());
        let spec = spec.unwrap();
        assert_eq!((spec.working_dir.as_str(), spec.user.as_str()), ("/", "root"));
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/false\nbroken\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\n";

    #[test]
    fn users_resolve_by_name_uid_and_group() {
        let user = |s| resolve_user(s, PASSWD, GROUP);
        assert_eq!(user("root"), Ok(User { uid: 0, gid: 0, home: "/root".into() }));
        assert_eq!(user("www"), Ok(User { uid: 33, gid: 34, home: "/var/www".into() }));
        assert_eq!(user("33"), Ok(User { uid: 33, gid: 34, home: "/var/www".into() }));
        assert_eq!(user("1000"), Ok(User { uid: 1000, gid: 0, home: "/".into() }));
        assert_eq!(user("1000:1001"), Ok(User { uid: 1000, gid: 1001, home: "/".into() }));
        assert_eq!(user("www:staff"), Ok(User { uid: 33, gid: 50, home: "/var/www".into() }));
        assert_eq!(user("nobody"), Err(SpecError::UnknownUser("nobody".into())));
        assert_eq!(user("www:wheel"), Err(SpecError::UnknownGroup("wheel".into())));
    }
}
