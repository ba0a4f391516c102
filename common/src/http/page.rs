//! Keyset pagination's query parameters (`?limit=&cursor=`), read the same way by every list:
//! a bad `limit` or `cursor` is a 422 naming the parameter, never a silent default.

use crate::problem::Problem;

/// The page sizes one list allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSize {
    /// The page size when `limit` is absent.
    pub default: usize,
    /// The largest `limit` accepted; larger ones are refused, not capped, so a client learns
    /// its page is smaller than it asked.
    pub max: usize,
}

/// One page request: how many items, and after which one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<C> {
    /// Items wanted, from 1 to the list's [`PageSize::max`].
    pub limit: usize,
    /// The last item of the previous page, as the list's own cursor type; `None` for the first.
    pub cursor: Option<C>,
}

impl<C> Page<C> {
    /// Reads the raw `limit` and `cursor` parameters. `parse_cursor` turns a cursor into the
    /// list's key, or says (as a `detail`) why it is not one.
    pub fn parse(
        limit: Option<&str>,
        cursor: Option<&str>,
        size: PageSize,
        parse_cursor: impl FnOnce(&str) -> Result<C, String>,
    ) -> Result<Self, Problem> {
        let limit = match limit {
            None => size.default,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=size.max).contains(n))
                .ok_or_else(|| {
                    Problem::invalid_field(
                        "limit",
                        format!("must be an integer from 1 to {}", size.max),
                    )
                })?,
        };
        let cursor = cursor
            .map(parse_cursor)
            .transpose()
            .map_err(|detail| Problem::invalid_field("cursor", detail))?;
        Ok(Self { limit, cursor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: PageSize = PageSize {
        default: 20,
        max: 100,
    };

    fn number(raw: &str) -> Result<u32, String> {
        raw.parse()
            .map_err(|_| "is not a cursor from this list".to_owned())
    }

    #[test]
    fn absent_parameters_mean_the_first_page_of_the_default_size() {
        let page = Page::parse(None, None, SIZE, number).unwrap();
        assert_eq!(
            page,
            Page {
                limit: 20,
                cursor: None
            }
        );
    }

    #[test]
    fn a_limit_and_cursor_are_read() {
        let page = Page::parse(Some("100"), Some("7"), SIZE, number).unwrap();
        assert_eq!(
            page,
            Page {
                limit: 100,
                cursor: Some(7)
            }
        );
        let page = Page::parse(Some("1"), None, SIZE, number).unwrap();
        assert_eq!(page.limit, 1);
    }

    #[test]
    fn a_bad_limit_is_refused_naming_limit() {
        for raw in ["0", "101", "-1", "ten", "", "1.5", " 5"] {
            let problem = Page::parse(Some(raw), None, SIZE, number).unwrap_err();
            assert_eq!(problem.status, 422, "{raw:?}");
            assert_eq!(problem.field.as_deref(), Some("limit"), "{raw:?}");
        }
    }

    #[test]
    fn a_bad_cursor_is_refused_naming_cursor() {
        let problem = Page::parse(Some("5"), Some("yesterday"), SIZE, number).unwrap_err();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.field.as_deref(), Some("cursor"));
    }
}
