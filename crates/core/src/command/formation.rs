//! Creating and dropping a formation.

use super::{valid_name, Outcome, MAX_SYNC_STANDBYS};
use crate::error::CoreError;
use crate::model::{ClusterState, Formation, FormationSettings};

impl ClusterState {
    pub(super) fn create_formation(
        &mut self,
        name: &str,
        number_sync_standbys: Option<u32>,
    ) -> Result<Outcome, CoreError> {
        if !valid_name(name) {
            return Err(CoreError::InvalidFormationName(name.to_owned()));
        }
        if self.formations.contains_key(name) {
            return Err(CoreError::FormationExists(name.to_owned()));
        }
        let mut settings = FormationSettings::default();
        if let Some(n) = number_sync_standbys {
            if n > MAX_SYNC_STANDBYS {
                return Err(CoreError::InvalidSetting(format!(
                    "number_sync_standbys {n} is above the maximum {MAX_SYNC_STANDBYS}"
                )));
            }
            settings.number_sync_standbys = n;
        }
        self.formations.insert(
            name.to_owned(),
            Formation {
                name: name.to_owned(),
                settings,
                groups: Default::default(),
            },
        );
        Ok(Outcome::Done {
            description: format!("formation {name} created"),
        })
    }

    pub(super) fn drop_formation(&mut self, name: &str) -> Result<Outcome, CoreError> {
        if !self.formations.contains_key(name) {
            return Err(CoreError::UnknownFormation(name.to_owned()));
        }
        if self.nodes.values().any(|n| n.formation == name) {
            return Err(CoreError::FormationNotEmpty(name.to_owned()));
        }
        self.formations.remove(name);
        Ok(Outcome::Done {
            description: format!("formation {name} dropped"),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{group, T0};
    use super::super::Command;
    use crate::{CoreError, ErrorClass};

    fn create(c: &mut crate::ClusterState, name: &str, n: Option<u32>) -> Result<(), CoreError> {
        c.apply(
            &Command::CreateFormation {
                name: name.into(),
                number_sync_standbys: n,
            },
            T0,
        )
        .map(|_| ())
    }

    #[test]
    fn a_formation_is_created_once_with_a_valid_name_and_bounded_settings() {
        let mut c = group(&[]);
        create(&mut c, "f1", Some(2)).unwrap();
        assert_eq!(c.formations["f1"].settings.number_sync_standbys, 2);
        assert_eq!(
            create(&mut c, "f1", None).unwrap_err().class(),
            ErrorClass::AlreadyExists
        );
        assert_eq!(
            create(&mut c, "F 1", None).unwrap_err().class(),
            ErrorClass::Invalid
        );
        assert_eq!(
            create(&mut c, "f2", Some(super::super::MAX_SYNC_STANDBYS + 1))
                .unwrap_err()
                .class(),
            ErrorClass::Invalid
        );
        assert!(!c.formations.contains_key("f2"));
    }

    #[test]
    fn only_an_empty_formation_is_dropped() {
        let mut c = group(&["a"]);
        let drop = |c: &mut crate::ClusterState, name: &str| {
            c.apply(&Command::DropFormation { name: name.into() }, T0)
        };
        assert!(matches!(
            drop(&mut c, crate::DEFAULT_FORMATION),
            Err(CoreError::FormationNotEmpty(_))
        ));
        assert!(matches!(
            drop(&mut c, "nope"),
            Err(CoreError::UnknownFormation(_))
        ));
        create(&mut c, "empty", None).unwrap();
        drop(&mut c, "empty").unwrap();
        assert!(!c.formations.contains_key("empty"));
    }
}
