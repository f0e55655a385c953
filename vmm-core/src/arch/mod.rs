//! Architecture support. Only x86_64 is implemented.

pub mod x86_64;

pub use self::x86_64::layout;
