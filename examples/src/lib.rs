//! Sample fleet manifests, image recipes and runnable examples for ignite.
//!
//! The fleet manifests arrive with the controller; today the runnable example is `scripts/demo.sh`,
//! which boots the demo microVM directly on the engine.
