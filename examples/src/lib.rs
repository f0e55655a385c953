//! Sample fleet manifests for ignite.
//!
//! `examples/fleet/*.yaml` is the demo fleet that `scripts/demo.sh` commits to a local git
//! repository and runs with `ignite daemon --gitops`; the controller's tests check that every
//! manifest there is valid.
