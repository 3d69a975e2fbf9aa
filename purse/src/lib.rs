//! # purse — the sans-IO core of tapgate
//!
//! Cards, SAMs, HSMs, keys, APDUs and wire formats as pure functions and state machines over
//! bytes. This crate never reads a clock (time is a parameter), never draws randomness it was
//! not handed (an `RngCore` parameter), never opens a file or a socket, and knows no tokio.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Declares a one-byte wire code: the enum with each variant's stable code, `from_code` (`None`
/// for a byte this version does not know) and `code`. The codes are on the wire and in reports,
/// so they are written once, here in each declaration, and never derived from the order. A wire
/// code is a plain value: `Clone, Copy, Debug, PartialEq, Eq, Hash` are derived here (a
/// declaration adds any other).
macro_rules! wire_code {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $code:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $code,)+
        }

        impl $name {
            /// Decodes a wire code; `None` for a code this version does not know.
            $vis fn from_code(c: u8) -> Option<$name> {
                match c {
                    $($code => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// The wire code.
            $vis fn code(self) -> u8 {
                self as u8
            }
        }
    };
}

pub mod actionlist;
pub mod apdu;
pub mod batch;
pub mod blocklist;
pub mod card;
pub mod confirm;
pub mod crypto;
pub mod keys;
pub mod receipt;
pub mod rekey;
pub mod rotation;
pub mod sam;
pub mod sm;
pub mod tap;
pub mod txn;

#[cfg(test)]
mod test_signing;
