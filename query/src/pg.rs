//! The Postgres wire protocol: `psql -h 127.0.0.1 -p 5433 -U meshscope -d meshscope`.
//!
//! `datafusion-postgres` (pgwire underneath) does the protocol, the simple and extended
//! query flows, the type mapping and the `pg_catalog` tables that psql and Grafana read.
//! meshscope adds its read-only rule as the first query hook, and its own accept loop so
//! that port 0 works and shutdown is clean. The loop runs on the query runtime.
//!
//! With tokens (`--auth-file`), a client logs in with a token's name as user and its secret
//! as password; the token needs the `read` scope. A token given by its plaintext `secret`
//! logs in with SCRAM-SHA-256 (pgwire's exchange over a key the auth crate derived at load:
//! the password never crosses the wire); a `secret-sha256` token, whose secret the server
//! never had, with a cleartext password (with `--tls-cert`, only over TLS).

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
use datafusion_postgres::pgwire::api::auth::sasl::scram::ScramAuth;
use datafusion_postgres::pgwire::api::auth::sasl::{
    SASLState, SCRAM_SHA_256_METHOD, SCRAM_SHA_256_PLUS_METHOD,
};
use datafusion_postgres::pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
    finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata,
};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::{ClientInfo, PgWireServerHandlers};
use datafusion_postgres::pgwire::api::{
    PgWireConnectionState, PidSecretKeyGenerator, RandomPidSecretKeyGenerator,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::startup::{Authentication, PasswordMessageFamily};
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

/// What every connection's login shares.
struct LoginConfig {
    auth: Auth,
    /// TLS is configured: a plaintext connection is refused.
    require_tls: bool,
    /// SCRAM-SHA-256-PLUS is offered over TLS: the exchange binds to the server's
    /// certificate (`tls-server-end-point`), so a relay that terminates TLS cannot pass it on.
    channel_binding: bool,
    pids: RandomPidSecretKeyGenerator,
    parameters: DefaultServerParameterProvider,
    scram: ScramAuth,
}

/// The start of one connection: open (no tokens), SCRAM-SHA-256 for a token that has a
/// [`meshscope_auth::ScramKey`], else a cleartext password that must be the secret of the
/// token named by the user.
struct Login {
    config: Arc<LoginConfig>,
    /// Where this connection's SCRAM exchange is (`None`: not offered, or over).
    sasl: std::sync::Mutex<Option<SASLState>>,
}

/// The SCRAM keys pgwire's exchange checks a proof against: the token's, by user name.
#[derive(Debug)]
struct ScramKeys(Auth);

#[async_trait]
#[allow(elided_lifetimes_in_paths)] // the trait's own signature, lifetimes as async_trait wants
impl AuthSource for ScramKeys {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        let key = self
            .0
            .scram_key(user)
            .ok_or_else(|| PgWireError::InvalidPassword(user.to_owned()))?;
        Ok(Password::new(
            Some(key.salt.to_vec()),
            key.salted_password.to_vec(),
        ))
    }
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
        let (pid, secret_key) = self.config.pids.generate(client);
        client.set_pid_and_secret_key(pid, secret_key);
        finish_authentication(client, &self.config.parameters).await
    }

    /// The SASL mechanisms this connection is offered: with channel binding over TLS first.
    fn mechanisms<C: ClientInfo>(&self, client: &C) -> &'static [&'static str] {
        if self.config.channel_binding && client.is_secure() {
            &[SCRAM_SHA_256_PLUS_METHOD, SCRAM_SHA_256_METHOD]
        } else {
            &[SCRAM_SHA_256_METHOD]
        }
    }

    fn set_sasl(&self, state: Option<SASLState>) {
        if let Ok(mut s) = self.sasl.lock() {
            *s = state;
        }
    }

    /// One step of the SCRAM exchange: the client's first message (answered with the
    /// server's nonce, salt and iterations) or its proof (answered with the server's
    /// signature and AuthenticationOk, or refused).
    async fn scram_step<C>(
        &self,
        client: &mut C,
        msg: PasswordMessageFamily,
        state: SASLState,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (msg, state) = match state {
            SASLState::Initial => {
                let first = msg.into_sasl_initial_response()?;
                if !self
                    .mechanisms(client)
                    .contains(&first.auth_method.as_str())
                {
                    return Err(PgWireError::UnsupportedSASLAuthMethod(first.auth_method));
                }
                (
                    PasswordMessageFamily::SASLInitialResponse(first),
                    SASLState::ScramClientFirstReceived,
                )
            }
            other => (
                PasswordMessageFamily::SASLResponse(msg.into_sasl_response()?),
                other,
            ),
        };
        let user = user_of(client);
        let auth = &self.config.auth;
        match self
            .config
            .scram
            .process_scram_message(client, msg, &state)
            .await
        {
            Ok((answer, SASLState::Finished)) => {
                match auth.check_scram_login(
                    meshscope_auth::Surface::Postgres,
                    &user,
                    true,
                    Scope::Read,
                ) {
                    Ok(_) => {
                        client
                            .send(PgWireBackendMessage::Authentication(answer))
                            .await?;
                        self.accept(client).await
                    }
                    Err(denied) => Err(refusal(&user, &denied)),
                }
            }
            Ok((answer, next)) => {
                self.set_sasl(Some(next));
                client
                    .send(PgWireBackendMessage::Authentication(answer))
                    .await?;
                Ok(())
            }
            Err(PgWireError::InvalidPassword(_)) => {
                let denied = auth
                    .check_scram_login(meshscope_auth::Surface::Postgres, &user, false, Scope::Read)
                    .err()
                    .unwrap_or(meshscope_auth::Denied::Invalid);
                Err(refusal(&user, &denied))
            }
            Err(e) => Err(e),
        }
    }
}

/// The user a connection's startup named.
fn user_of<C: ClientInfo>(client: &C) -> String {
    LoginInfo::from_client_info(client)
        .user()
        .unwrap_or_default()
        .to_owned()
}

/// The FATAL answer to a refused login: 28P01 invalid_password (unknown user or wrong
/// secret, which are not told apart) or 42501 insufficient_privilege.
fn refusal(user: &str, denied: &meshscope_auth::Denied) -> PgWireError {
    if denied.is_unauthenticated() {
        login_refused(
            "28P01",
            format!(
                "password authentication failed for user {user:?}: the user is a token's name \
                 and the password its secret"
            ),
        )
    } else {
        login_refused("42501", denied.to_string())
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
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                if self.config.require_tls && !client.is_secure() {
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
                if self.config.auth.is_open() {
                    return self.accept(client).await;
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                let ask = if self.config.auth.scram_key(&user_of(client)).is_some() {
                    self.set_sasl(Some(SASLState::Initial));
                    Authentication::SASL(
                        self.mechanisms(client)
                            .iter()
                            .map(|m| (*m).to_owned())
                            .collect(),
                    )
                } else {
                    Authentication::CleartextPassword
                };
                client
                    .send(PgWireBackendMessage::Authentication(ask))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(msg) => {
                let sasl = self.sasl.lock().ok().and_then(|mut s| s.take());
                if let Some(state) = sasl {
                    return self.scram_step(client, msg, state).await;
                }
                let pwd = msg.into_password()?;
                let user = user_of(client);
                match self.config.auth.check_login(
                    meshscope_auth::Surface::Postgres,
                    &user,
                    pwd.password.as_bytes(),
                    Scope::Read,
                ) {
                    Ok(_) => self.accept(client).await?,
                    Err(denied) => return Err(refusal(&user, &denied)),
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
    login: Arc<LoginConfig>,
}

impl PgWireServerHandlers for Handlers {
    /// Called once per connection: each gets its own login state.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(Login {
            config: Arc::clone(&self.login),
            sasl: std::sync::Mutex::new(None),
        })
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
    tls: Option<meshscope_auth::tls::Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut scram = ScramAuth::new(Arc::new(ScramKeys(auth.clone())));
    scram.set_iterations(meshscope_auth::SCRAM_ITERATIONS as usize);
    let channel_binding = match &tls {
        Some(t) => match scram.configure_certificate(t.identity_pem().0) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "SCRAM channel binding is not offered: the certificate's signature algorithm has no tls-server-end-point hash");
                false
            }
        },
        None => false,
    };
    let tls = tls.as_ref().map(meshscope_auth::tls::Tls::postgres);
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
        login: Arc::new(LoginConfig {
            scram,
            auth,
            require_tls: tls.is_some(),
            channel_binding,
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

    /// The auth crate's key is the one pgwire's SCRAM (and libpq) derive from the secret.
    #[test]
    fn a_tokens_scram_key_is_pgwires_salted_password() {
        use datafusion_postgres::pgwire::api::auth::sasl::scram::gen_salted_password;
        let secret = "read-secret-for-grafana-000000002";
        let auth = Auth::from_specs(vec![meshscope_auth::TokenSpec {
            name: "grafana".into(),
            secret: Some(secret.into()),
            secret_sha256: None,
            scram_salted_password: None,
            scopes: vec![Scope::Read],
        }])
        .expect("auth");
        let key = auth.scram_key("grafana").expect("key");
        let expected =
            gen_salted_password(secret, &key.salt, meshscope_auth::SCRAM_ITERATIONS as usize);
        assert_eq!(key.salted_password.as_slice(), expected.as_slice());
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
