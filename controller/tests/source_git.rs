//! The git and directory sources against real repositories: file:// and git daemon remotes,
//! branch/tag/commit pinning, amended and force-pushed history, deleted files, a remote that
//! vanishes, and the poller.

mod support;

use std::time::Duration;

use controller::source::{
    spawn_poller, DirSpec, DirectorySource, GitRef, GitSource, GitSpec, Source, SourceError, SourceKind, SourceSpec,
    SyncOutcome,
};
use support::git::{git, GitDaemon, Repo};

fn spec(url: &str, reference: GitRef, path: &str) -> SourceSpec {
    SourceSpec {
        name: "fleet".into(),
        kind: SourceKind::Git(GitSpec {
            url: url.into(),
            reference,
            path: path.into(),
            interval: Duration::from_secs(30),
            credentials: None,
        }),
    }
}

fn branch() -> GitRef {
    GitRef::Branch("main".into())
}

fn paths(snapshot: &controller::source::Snapshot) -> Vec<&str> {
    snapshot.files.iter().map(|f| f.path.as_str()).collect()
}

#[test]
fn follows_a_branch_through_commits_amends_force_pushes_and_deletions() {
    let repo = Repo::new();
    let c1 =
        repo.commit(&[("vms/a.yaml", Some("a: 1\n")), ("vms/sub/b.yml", Some("b\n")), ("README.md", Some("x"))], "one");
    let cache = tempfile::tempdir().unwrap();
    let source = GitSource::new(spec(&repo.url(), branch(), "vms"), cache.path()).unwrap();
    let s1 = source.sync().unwrap();
    assert_eq!(s1.revision, c1);
    assert_eq!(paths(&s1), ["vms/a.yaml", "vms/sub/b.yml"], "only manifests under the path");
    assert_eq!(s1.files[0].text, "a: 1\n");

    let amended = repo.amend(&[("vms/a.yaml", "a: 2\n")]);
    let s2 = source.sync().unwrap();
    assert_eq!(s2.revision, amended, "the force-pushed amend is followed");
    assert_eq!(s2.files[0].text, "a: 2\n");

    let c3 = repo.commit(&[("vms/sub/b.yml", None), ("vms/broken.yaml", Some("::: not yaml"))], "delete b");
    let s3 = source.sync().unwrap();
    assert_eq!(s3.revision, c3);
    assert_eq!(paths(&s3), ["vms/a.yaml", "vms/broken.yaml"], "deleted file gone, broken file delivered verbatim");
    assert_eq!(s3.files[1].text, "::: not yaml");
}

#[test]
fn pins_tags_and_commits_and_reports_missing_refs_and_paths() {
    let repo = Repo::new();
    let c1 = repo.commit(&[("a.yaml", Some("one\n"))], "one");
    git(&repo.work, &["tag", "v1"]);
    git(&repo.work, &["push", "-q", "origin", "v1"]);
    repo.commit(&[("a.yaml", Some("two\n"))], "two");
    let cache = tempfile::tempdir().unwrap();
    let tagged = GitSource::new(spec(&repo.url(), GitRef::Tag("v1".into()), ""), cache.path()).unwrap();
    assert_eq!(tagged.sync().unwrap().revision, c1);
    let pinned = GitSource::new(spec(&repo.url(), GitRef::Commit(c1[..10].into()), ""), cache.path()).unwrap();
    let snap = pinned.sync().unwrap();
    assert_eq!((snap.revision.as_str(), snap.files[0].text.as_str()), (c1.as_str(), "one\n"));

    let missing = GitSource::new(spec(&repo.url(), GitRef::Branch("nope".into()), ""), cache.path()).unwrap();
    let err = missing.sync().unwrap_err();
    assert!(matches!(err, SourceError::RefNotFound { .. }), "{err}");
    assert!(err.to_string().contains("branch nope"), "{err}");
    let no_path = GitSource::new(spec(&repo.url(), branch(), "clusters/prod"), cache.path()).unwrap();
    let err = no_path.sync().unwrap_err();
    assert!(matches!(err, SourceError::PathNotFound { .. }) && err.to_string().contains("clusters/prod"), "{err}");
}

#[test]
fn a_vanished_remote_is_an_error_naming_it_and_a_returning_one_works_again() {
    let repo = Repo::new();
    let c1 = repo.commit(&[("a.yaml", Some("one\n"))], "one");
    let cache = tempfile::tempdir().unwrap();
    let source = GitSource::new(spec(&repo.url(), branch(), ""), cache.path()).unwrap();
    assert_eq!(source.sync().unwrap().revision, c1);
    let moved = repo.dir.path().join("moved.git");
    std::fs::rename(&repo.remote, &moved).unwrap();
    let err = source.sync().unwrap_err();
    assert!(matches!(err, SourceError::RemoteUnreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&repo.url()), "{err}");
    std::fs::rename(&moved, &repo.remote).unwrap();
    assert_eq!(source.sync().unwrap().revision, c1);
}

#[test]
fn git_daemon_remotes_work_and_a_dead_daemon_is_unreachable() {
    let repo = Repo::new();
    let c1 = repo.commit(&[("a.yaml", Some("one\n"))], "one");
    let daemon = GitDaemon::start(repo.dir.path());
    let url = format!("git://127.0.0.1:{}/remote.git", daemon.port);
    let cache = tempfile::tempdir().unwrap();
    let source = GitSource::new(spec(&url, branch(), ""), cache.path()).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(source.sync().unwrap().revision, c1);
    eprintln!("git daemon sync took {:?}", started.elapsed());
    drop(daemon);
    let err = source.sync().unwrap_err();
    assert!(matches!(err, SourceError::RemoteUnreachable { .. }), "{err:?}");
}

#[test]
fn directory_revisions_change_exactly_when_a_manifest_does() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("vms")).unwrap();
    std::fs::write(dir.path().join("vms/a.yaml"), "a\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let spec = SourceSpec {
        name: "local".into(),
        kind: SourceKind::Directory(DirSpec { path: dir.path().into(), interval: Duration::from_secs(1) }),
    };
    let source = DirectorySource::new(spec);
    let r1 = source.sync().unwrap();
    assert_eq!(paths(&r1), ["vms/a.yaml"]);
    std::fs::write(dir.path().join("notes.txt"), "y").unwrap();
    assert_eq!(source.sync().unwrap().revision, r1.revision, "non-manifests do not count");
    std::fs::write(dir.path().join("vms/a.yaml"), "b\n").unwrap();
    assert_ne!(source.sync().unwrap().revision, r1.revision);
    std::fs::write(dir.path().join("vms/bad.yaml"), [0xff, 0xfe]).unwrap();
    assert!(matches!(source.sync().unwrap_err(), SourceError::NotUtf8 { ref file, .. } if file == "vms/bad.yaml"));
}

#[tokio::test]
async fn the_poller_reports_changes_and_errors_once_and_syncs_on_demand() {
    let repo = Repo::new();
    let c1 = repo.commit(&[("a.yaml", Some("one\n"))], "one");
    let cache = tempfile::tempdir().unwrap();
    let source = GitSource::new(spec(&repo.url(), branch(), ""), cache.path()).unwrap();
    let (trigger, trigger_rx) = tokio::sync::mpsc::channel(1);
    let mut outcomes = spawn_poller(Box::new(source), Duration::from_secs(3600), trigger_rx);
    let next = |o: Option<SyncOutcome>| o.expect("poller alive");
    match next(outcomes.recv().await) {
        SyncOutcome::Changed(s) => assert_eq!(s.revision, c1),
        other => panic!("{other:?}"),
    }
    trigger.send(()).await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), outcomes.recv()).await;
    assert!(quiet.is_err(), "an unchanged revision is not reported again");
    let c2 = repo.commit(&[("a.yaml", Some("two\n"))], "two");
    trigger.send(()).await.unwrap();
    match next(outcomes.recv().await) {
        SyncOutcome::Changed(s) => assert_eq!(s.revision, c2, "on-demand sync sees the new commit at once"),
        other => panic!("{other:?}"),
    }
    std::fs::rename(&repo.remote, repo.dir.path().join("gone.git")).unwrap();
    trigger.send(()).await.unwrap();
    assert!(matches!(next(outcomes.recv().await), SyncOutcome::Failed(SourceError::RemoteUnreachable { .. })));
}

#[test]
fn plain_paths_work_symlinks_are_skipped_and_binary_manifests_are_named() {
    let repo = Repo::new();
    std::os::unix::fs::symlink("/etc/passwd", repo.work.join("escape.yaml")).unwrap();
    let c1 = repo.commit(&[("a.yaml", Some("a\n"))], "one");
    let cache = tempfile::tempdir().unwrap();
    let plain = repo.remote.to_str().unwrap();
    let source = GitSource::new(spec(plain, branch(), ""), cache.path()).unwrap();
    let s1 = source.sync().unwrap();
    assert_eq!((s1.revision.as_str(), paths(&s1)), (c1.as_str(), vec!["a.yaml"]), "the symlink is not followed");

    std::fs::write(repo.work.join("bin.yaml"), [0xff, 0xfe, 0x00]).unwrap();
    let c2 = repo.commit(&[], "binary");
    let err = source.sync().unwrap_err();
    let SourceError::NotUtf8 { ref file, ref revision } = err else { panic!("{err:?}") };
    assert_eq!((file.as_str(), revision.as_str()), ("bin.yaml", c2.as_str()));
    assert!(err.to_string().contains("bin.yaml") && err.to_string().contains(&c2), "{err}");
}
