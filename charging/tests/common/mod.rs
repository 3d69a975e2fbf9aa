//! The charging server in process on a loopback port, for HTTP tests: the test kit's
//! (`tapgate_testkit::charging`), under the names these suites use.
#![allow(dead_code, unused_imports)]

pub use tapgate_testkit::charging::{
    hsm, post, post_with_key, register_instrument, start, start_with, start_with_hsm, HsmKind,
};

/// A running server (the kit's [`tapgate_testkit::charging::ChargingServer`]).
pub type Running = tapgate_testkit::charging::ChargingServer;

/// `both_hsms!(a, b)`: for each `fn a(kind: HsmKind)`, the tests `a::software` and
/// `a::pkcs11` — the same scenario and the same expected outcomes with either HSM.
#[allow(unused_macros)] // used by the suites that touch the HSM, not by every test file
macro_rules! both_hsms {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn software() {
                    super::$name(super::common::HsmKind::Software)
                }
                #[test]
                fn pkcs11() {
                    super::$name(super::common::HsmKind::Pkcs11)
                }
            }
        )*
    };
}
