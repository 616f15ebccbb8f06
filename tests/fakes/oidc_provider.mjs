// Starts oidc-provider (npm; a certified OpenID provider nobody here wrote) on a free 127.0.0.1 port for the
// interoperability tests: discovery, the device flow, dynamic registration, PKCE (required), rotating refresh
// tokens, revocation, the development login and consent pages that the tests drive over HTTP, and the
// client_credentials grant issuing JWT access tokens for one API named by a resource indicator (RFC 8707).
// Prints "listening on http(s)://127.0.0.1:PORT" once it serves.
//
// Usage: node oidc_provider.mjs NODE_MODULES_DIR [OPTIONS_JSON_FILE]
// The options file may hold "clients" (more client metadata, e.g. a private_key_jwt client with the public JWKS
// of a key the test generated) and "tls" ({"key", "cert", "ca"}: PEM files). With "tls" it serves HTTPS and asks
// for a client certificate, which the mTLS feature reads from the TLS socket (tls_client_auth, RFC 8705 §2: the
// certificate must be signed by "ca" and its subject must be the client's tls_client_auth_subject_dn).
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.argv[2], 'noop.js'));
const { default: Provider } = await import(require.resolve('oidc-provider'));
const options = process.argv[3] ? JSON.parse(readFileSync(process.argv[3], 'utf8')) : {};
const tls = options.tls;

// The API the client_credentials tokens are for: the resource indicator a client sends, and the token's audience.
const API = 'https://api.interop.test/';

const server = tls
  ? createTlsServer({
    key: readFileSync(tls.key), cert: readFileSync(tls.cert), ca: readFileSync(tls.ca),
    requestCert: true, rejectUnauthorized: false, // discovery is fetched without a certificate too
  })
  : createServer();

// The client certificate of the request's TLS connection, if any (an X509Certificate).
const certificateOf = (ctx) => (typeof ctx.req.socket.getPeerX509Certificate === 'function'
  ? ctx.req.socket.getPeerX509Certificate() : undefined);

server.listen(0, '127.0.0.1', () => {
  const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'tokenproxy-interop',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/callback'],
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
    }, ...(options.clients || [])],
    clientAuthMethods: ['none', 'client_secret_basic', 'client_secret_post', 'private_key_jwt',
      ...(tls ? ['tls_client_auth'] : [])],
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      registration: { enabled: true },
      revocation: { enabled: true },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        getResourceServerInfo: (ctx, resource) => {
          if (resource !== API) throw new Error(`unknown resource ${resource}`);
          return { scope: 'api:read', audience: API, accessTokenTTL: 600, accessTokenFormat: 'jwt' };
        },
      },
      mTLS: {
        enabled: Boolean(tls),
        tlsClientAuth: Boolean(tls),
        getCertificate: certificateOf,
        certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
        certificateSubjectMatches: (ctx, property, expected) => property === 'tls_client_auth_subject_dn'
          && certificateOf(ctx)?.subject.split('\n').join(',') === expected,
      },
    },
    pkce: { methods: ['S256'], required: () => true },
    rotateRefreshToken: true,
    // A refresh token for every client allowed the grant, without the offline_access consent dance.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    scopes: ['openid', 'offline_access', 'api:read'],
    findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    ttl: { AccessToken: 600, ClientCredentials: 600, DeviceCode: 300, Interaction: 300, Session: 300, Grant: 300,
      RefreshToken: 3600 },
  });
  provider.proxy = false;
  server.on('request', provider.callback());
  console.log(`listening on ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
