//! In-database tests (`cargo pgrx test`): the SQL API, its validation and
//! error codes. They run inside a transaction that is rolled back, so nothing
//! here is ever decoded; committed behaviour is tested end to end in
//! `pg_test/`.
