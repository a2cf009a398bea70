// An OpenID Connect provider on 127.0.0.1 for the console's sign-in test: node provider.mjs PORT REDIRECT_URI.
// oidc-provider's own development sign-in pages: any login is accepted and becomes the account's e-mail claim.
import Provider from 'oidc-provider';

const [port, redirectUri, clientSecret] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: 'dataloader-console',
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    response_types: ['code'],
    grant_types: ['authorization_code'],
  }],
  async findAccount(ctx, id) {
    return { accountId: id, async claims() { return { sub: id, email: id, email_verified: true }; } };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: [] },
  // The e-mail in the ID token itself, as most providers do: Streamlit reads st.user from the ID token.
  conformIdTokenClaims: false,
  cookies: { keys: ['dataloader-test-only'] },
  features: { devInteractions: { enabled: true } },
});
provider.listen(Number(port), '127.0.0.1', () => console.log(`oidc-provider listening on ${issuer}`));
