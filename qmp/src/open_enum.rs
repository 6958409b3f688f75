//! The `open_enum!` macro: enums for QAPI string enums that keep working when QEMU adds a value.
//!
//! Each generated enum has one variant per value we know plus `Unknown(String)`, (de)serializes as the QAPI
//! string, and prints as it with `Display`, so a newer QEMU never makes a reply or event undecodable.

/// Declares an open enum: `Variant => "qapi-name"` pairs, plus an `Unknown(String)` catch-all.
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this version of qmpbak does not know, as QEMU sent it.
            Unknown(String),
        }

        impl $name {
            /// The QAPI name of this value.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $wire, )+
                    Self::Unknown(other) => other,
                }
            }

            /// Whether this is one of the values qmpbak knows.
            pub fn is_known(&self) -> bool {
                !matches!(self, Self::Unknown(_))
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                match value {
                    $( $wire => Self::$variant, )+
                    other => Self::Unknown(other.to_owned()),
                }
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                match Self::from(value.as_str()) {
                    Self::Unknown(_) => Self::Unknown(value),
                    known => known,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = <String as serde::Deserialize>::deserialize(deserializer)?;
                Ok(Self::from(value))
            }
        }
    };
}

pub(crate) use open_enum;

#[cfg(test)]
mod tests {
    open_enum! {
        /// A test enum.
        pub enum Colour {
            Red => "red",
            DarkBlue => "dark-blue",
        }
    }

    #[test]
    fn known_values_round_trip() {
        let c: Colour = serde_json::from_str("\"dark-blue\"").unwrap();
        assert_eq!(c, Colour::DarkBlue);
        assert!(c.is_known());
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"dark-blue\"");
        assert_eq!(c.to_string(), "dark-blue");
    }

    #[test]
    fn unknown_values_are_kept() {
        let c: Colour = serde_json::from_str("\"ultraviolet\"").unwrap();
        assert_eq!(c, Colour::Unknown("ultraviolet".into()));
        assert!(!c.is_known());
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"ultraviolet\"");
        assert_eq!(Colour::from("red"), Colour::Red);
        assert_eq!(Colour::from(String::from("red")), Colour::Red);
    }

    #[test]
    fn non_strings_are_rejected() {
        assert!(serde_json::from_str::<Colour>("3").is_err());
    }
}
