// Starts oidc-provider (npm; a certified OpenID provider nobody here wrote) on a free 127.0.0.1 port for the
// interoperability tests: discovery, the device flow, dynamic registration, PKCE (required), rotating refresh
// tokens, revocation, and the development login and consent pages that the tests drive over HTTP.
// Prints "listening on http://127.0.0.1:PORT" once it serves. Usage: node oidc_provider.mjs NODE_MODULES_DIR
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.argv[2], 'noop.js'));
const { default: Provider } = await import(require.resolve('oidc-provider'));

const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'tokenproxy-interop',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/callback'],
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
    }],
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      registration: { enabled: true },
      revocation: { enabled: true },
    },
    pkce: { methods: ['S256'], required: () => true },
    rotateRefreshToken: true,
    // A refresh token for every client allowed the grant, without the offline_access consent dance.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    scopes: ['openid', 'offline_access'],
    findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    ttl: { AccessToken: 600, DeviceCode: 300, Interaction: 300, Session: 300, Grant: 300, RefreshToken: 3600 },
  });
  provider.proxy = false;
  server.on('request', provider.callback());
  console.log(`listening on ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
