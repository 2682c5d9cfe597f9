//! The Postgres wire protocol: `psql -h 127.0.0.1 -p 5433 -U meshscope -d meshscope`.
//!
//! `datafusion-postgres` (pgwire underneath) does the protocol, the simple and extended
//! query flows, the type mapping and the `pg_catalog` tables that psql and Grafana read.
//! meshscope adds its read-only rule as the first query hook, and its own accept loop so
//! that port 0 works and shutdown is clean. The loop runs on the query runtime.
//!
//! With tokens (`--auth-file`), a client logs in with a token's name as user and its secret
//! as password (cleartext password authentication: put TLS in front of it on a shared
//! network); the token needs the `read` scope.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::{
    DefaultServerParameterProvider, LoginInfo, StartupHandler, finish_authentication,
    protocol_negotiation, save_startup_parameters_to_metadata,
};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::{ClientInfo, PgWireServerHandlers};
use datafusion_postgres::pgwire::api::{
    PgWireConnectionState, PidSecretKeyGenerator, RandomPidSecretKeyGenerator,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::startup::Authentication;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::{DfSessionService, QueryHook};
use futures::{Sink, SinkExt};
use meshscope_auth::{Auth, Scope};
use tokio::net::TcpListener;

use std::future::Future;

use datafusion_postgres::pgwire::api::ClientPortalStore;
use datafusion_postgres::pgwire::api::portal::Portal;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::messages::extendedquery::Execute;
use datafusion_postgres::pgwire::messages::simplequery::Query;

use crate::engine::{QueryEngine, QueryError};
use crate::readonly::{self, Surface};

/// Refuses every statement that is not read-only, before any other hook sees it.
#[derive(Debug)]
struct ReadOnlyHook;

fn refused(statement: &Statement) -> Option<PgWireError> {
    readonly::check(statement, Surface::Postgres)
        .err()
        .map(|e| {
            // SQLSTATE 25006: read_only_sql_transaction
            PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "25006".into(),
                e.to_string(),
            )))
        })
}

#[async_trait]
impl QueryHook for ReadOnlyHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refused(statement).map(Err)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        refused(statement).map(Err)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refused(statement).map(Err)
    }
}

/// The start of a connection: open (no tokens), or a cleartext password that must be the
/// secret of the token named by the user.
struct Login {
    auth: Auth,
    /// TLS is configured: a plaintext connection is refused.
    require_tls: bool,
    pids: RandomPidSecretKeyGenerator,
    parameters: DefaultServerParameterProvider,
}

/// An error answer with its severity and SQLSTATE.
fn user_error(severity: &str, code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        severity.into(),
        code.into(),
        message,
    )))
}

/// A FATAL error during login.
fn login_refused(code: &str, message: String) -> PgWireError {
    user_error("FATAL", code, message)
}

impl Login {
    /// AuthenticationOk, the server's parameters and ReadyForQuery.
    async fn accept<C>(&self, client: &mut C) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, secret_key) = self.pids.generate(client);
        client.set_pid_and_secret_key(pid, secret_key);
        finish_authentication(client, &self.parameters).await
    }
}

#[async_trait]
impl StartupHandler for Login {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                if self.require_tls && !client.is_secure() {
                    // 28000 invalid_authorization_specification, as PostgreSQL's hostssl.
                    return Err(login_refused(
                        "28000",
                        "this server takes TLS connections only: connect with sslmode=require \
                         (or verify-full with the server's CA)"
                            .into(),
                    ));
                }
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.auth.is_open() {
                    return self.accept(client).await;
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let login = LoginInfo::from_client_info(client);
                let user = login.user().unwrap_or_default().to_owned();
                match self.auth.check_login(
                    meshscope_auth::Surface::Postgres,
                    &user,
                    pwd.password.as_bytes(),
                    Scope::Read,
                ) {
                    Ok(_) => self.accept(client).await?,
                    // 28P01 invalid_password; 42501 insufficient_privilege.
                    Err(denied) if denied.is_unauthenticated() => {
                        return Err(login_refused(
                            "28P01",
                            format!(
                                "password authentication failed for user {user:?}: the user is a \
                                 token's name and the password its secret"
                            ),
                        ));
                    }
                    Err(denied) => return Err(login_refused("42501", denied.to_string())),
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The session service within the engine's limits: each statement (its planning and the
/// sending of every row) takes a place among the running queries and is cancelled at the
/// query timeout with SQLSTATE 57014, or refused with 53300 when no place frees up.
struct Bounded {
    inner: Arc<DfSessionService>,
    engine: QueryEngine,
}

impl Bounded {
    async fn run(&self, statement: impl Future<Output = PgWireResult<()>>) -> PgWireResult<()> {
        let outcome = self
            .engine
            .bounded(async { Ok::<_, QueryError>(statement.await) })
            .await;
        match outcome {
            Ok(r) => r,
            Err(e @ QueryError::Timeout { .. }) => Err(user_error("ERROR", "57014", e.to_string())),
            Err(e @ QueryError::Busy { .. }) => Err(user_error("ERROR", "53300", e.to_string())),
            Err(e) => Err(user_error("ERROR", "XX000", e.to_string())),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Bounded {
    async fn on_query<C>(&self, client: &mut C, query: Query) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.run(self.inner.on_query(client, query)).await
    }

    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        SimpleQueryHandler::do_query(&*self.inner, client, query).await
    }
}

#[async_trait]
impl ExtendedQueryHandler for Bounded {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.inner.query_parser()
    }

    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.run(self._on_execute(client, message)).await
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        ExtendedQueryHandler::do_query(&*self.inner, client, portal, max_rows).await
    }
}

struct Handlers {
    service: Arc<Bounded>,
    login: Arc<Login>,
}

impl PgWireServerHandlers for Handlers {
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.login)
    }

    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.service)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.service)
    }
}

/// Serves the Postgres protocol on `listener` until `shutdown` completes. Call it on the
/// query runtime (`engine.executor().spawn(…)`).
pub async fn serve(
    listener: std::net::TcpListener,
    engine: QueryEngine,
    auth: Auth,
    tls: Option<datafusion_postgres::pgwire::tokio::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let ctx = Arc::clone(engine.context());
    setup_pg_catalog(&ctx, "datafusion", EmptyContextProvider)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        Arc::new(ReadOnlyHook),
        Arc::new(CursorStatementHook),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    let handlers = Arc::new(Handlers {
        service: Arc::new(Bounded {
            inner: Arc::new(DfSessionService::new_with_hooks(ctx, hooks)),
            engine,
        }),
        login: Arc::new(Login {
            auth,
            require_tls: tls.is_some(),
            pids: RandomPidSecretKeyGenerator::default(),
            parameters: DefaultServerParameterProvider::default(),
        }),
    });
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let handlers = Arc::clone(&handlers);
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        if let Err(e) = datafusion_postgres::pgwire::tokio::process_socket(socket, tls, handlers).await {
                            tracing::debug!(%peer, error = %e, "postgres connection ended with an error");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accepting a postgres connection failed"),
            },
            () = &mut shutdown => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    use super::*;

    fn statement(sql: &str) -> Statement {
        Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0)
    }

    #[test]
    fn writes_are_refused_with_sqlstate_25006_and_reads_pass() {
        for sql in [
            "DELETE FROM spans",
            "INSERT INTO spans SELECT * FROM spans",
            "CREATE TABLE t (a int)",
            "DROP TABLE spans",
            "COPY spans TO '/tmp/x'",
        ] {
            let Some(PgWireError::UserError(info)) = refused(&statement(sql)) else {
                panic!("{sql} was not refused");
            };
            assert_eq!(info.code, "25006", "{sql}");
        }
        for sql in [
            "SELECT count(*) FROM spans",
            "WITH t AS (SELECT 1) SELECT * FROM t",
            "EXPLAIN SELECT 1",
        ] {
            assert!(refused(&statement(sql)).is_none(), "{sql} was refused");
        }
    }
}
