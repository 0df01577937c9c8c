// A tern certificate plugin in JavaScript, built into a Wasm component with componentize-js (contract 0.2).
//
// It does what the shipped Rust Redis plugin does in its default layout: `GET <name>.crt` and `GET <name>.key`
// (one MGET through the host's key-value capability), then the same for `*.<parent>` when the exact name has
// nothing, and an optional TTL key passed on as the cache hint. The same MGET reads an optional route key beside
// them, holding one line: `pool NAME` (an `[[upstream]]` of the host), `origin http://host:port` (or https), or
// `passthrough host:port` (tern forwards the connection untouched; no certificate needed). Without it, the
// listener's backend. The host checks every route against the plugin's `grants.routes`.
// Kept small as an example: unlike the Rust plugin it reads no RSA member, and a route applies to the
// certificate stored beside it only (the Rust plugin applies an exact name's route to a wildcard certificate too).
//
// Settings (the plugin's `settings` table in tern.toml; all optional):
//   cert_key = "{name}.crt"   key_key = "{name}.key"   ttl_key (unset: no TTL)   wildcard = "true"
//   route_key (unset: beside the certificate, `cert_key` up to and including `{name}`, then `.route`: so
//   `{name}.route` by default, and `cert:{name}.route` for `cert:{name}.crt`, inside the prefixes of `grants.kv`
//   that already let the plugin read the certificate)
//
// WIT to JavaScript, as componentize-js maps it: `select-certificate` is exported as `selectCertificate` and
// gets the `hello` record as an object `{ servername, listener }`; record fields are camelCase
// (`private-key` is `privateKey`, `ttl-seconds` is `ttlSeconds`); a `result` is returned by returning its ok
// value and failed by throwing; a `variant` is `{ tag, val }` (`{ tag: 'serve', val: { certificates, route,
// ttlSeconds } }`, `{ tag: 'origin', val: url }`, `{ tag: 'not-found' }`); an `option` is the value or
// `undefined`; a `list` is an array, except `list<u8>`, which is a Uint8Array.
//
// The same source also builds with componentize-qjs (QuickJS; `scripts/build-polyglot.sh` makes both): there an
// absent `option` is `null`, not `undefined` (so every test for absence here is `== null`, true for both), and
// there is no TextDecoder (so `utf8` falls back to a decoder that throws on bad UTF-8 as a fatal TextDecoder does).

import { getMany } from 'tern:plugin/kv@0.2.0';
import { get as setting } from 'tern:plugin/config@0.2.0';
import { log } from 'tern:plugin/log@0.2.0';

const U32_MAX = 2 ** 32 - 1;
const utf8 =
  typeof TextDecoder === 'function'
    ? new TextDecoder('utf-8', { fatal: true })
    : {
        // Bytes as one char each, then UTF-8 decoded: decodeURIComponent throws a URIError on invalid UTF-8.
        decode(bytes) {
          let binary = '';
          for (let i = 0; i < bytes.length; i += 4096) {
            binary += String.fromCharCode.apply(null, bytes.slice(i, i + 4096));
          }
          return decodeURIComponent(escape(binary));
        },
      };

function describe(error) {
  const e = error?.payload ?? error;
  return e?.tag ? `key-value store ${e.tag}: ${e.val}` : String(e);
}

function text(bytes, what, name) {
  try {
    return utf8.decode(bytes);
  } catch {
    throw `${what} of ${name} is not UTF-8 PEM`;
  }
}

// What a route value says: `{ route }` (a WIT `route` variant) or `{ passthrough: target }`. The first line that
// is neither blank nor a `#` comment counts, as in the file-path plugin's route files.
function parseRoute(raw, name) {
  const line = raw.split('\n').map((l) => l.trim()).find((l) => l !== '' && !l.startsWith('#')) ?? '';
  const [, kind, value] = /^(\S+)\s+(.+)$/.exec(line) ?? [];
  switch (kind) {
    case 'pool':
    case 'origin':
      return { route: { tag: kind, val: value } };
    case 'passthrough':
      return { passthrough: value };
    default:
      throw (
        `route of ${name}: expected \`pool NAME\`, \`origin URL\` or \`passthrough HOST:PORT\`, ` +
        `got ${JSON.stringify(line)}`
      );
  }
}

// The default route key template: `certKey` up to and including `{name}`, then `.route`.
function routeBeside(certKey) {
  const at = certKey.indexOf('{name}');
  return at < 0 ? '{name}.route' : `${certKey.slice(0, at)}{name}.route`;
}

// The answer stored for `name` (a WIT `answer`), or undefined if it has no passthrough route and its chain or
// key is missing.
function fetch(name) {
  const fill = (template) => template.replaceAll('{name}', name);
  const certKey = setting('cert_key') ?? '{name}.crt';
  const keys = [
    fill(certKey),
    fill(setting('key_key') ?? '{name}.key'),
    fill(setting('route_key') ?? routeBeside(certKey)),
  ];
  const ttlKey = setting('ttl_key');
  if (ttlKey != null) keys.push(fill(ttlKey));
  let values;
  try {
    values = getMany(keys);
  } catch (error) {
    throw describe(error);
  }
  const [chain, key, route, ttl] = values;
  const parsed = route == null ? {} : parseRoute(text(route, 'route', name), name);
  if (parsed.passthrough === undefined && (chain == null || key == null)) return undefined;
  let ttlSeconds;
  if (ttl != null) {
    const raw = text(ttl, 'ttl', name).trim();
    if (!/^[0-9]+$/.test(raw)) throw `ttl of ${name}: expected whole seconds, got ${JSON.stringify(raw)}`;
    ttlSeconds = Math.min(Number(raw), U32_MAX); // what WIT's u32 holds; the host caps the TTL anyway
  }
  if (parsed.passthrough !== undefined) {
    return { tag: 'passthrough', val: { target: parsed.passthrough, ttlSeconds } };
  }
  const certificate = { chain: text(chain, 'certificate', name), privateKey: text(key, 'key', name) };
  return { tag: 'serve', val: { certificates: [certificate], route: parsed.route, ttlSeconds } };
}

// `*.<parent>` for a name with at least two labels under the wildcard (`*.com` is never valid).
function wildcardOf(name) {
  const dot = name.indexOf('.');
  const parent = name.slice(dot + 1);
  return dot > 0 && parent.includes('.') ? `*.${parent}` : undefined;
}

export function selectCertificate({ servername }) {
  let found = fetch(servername);
  const pattern = wildcardOf(servername);
  if (found == null && (setting('wildcard') ?? 'true') === 'true' && pattern !== undefined) {
    found = fetch(pattern);
    if (found != null) log('debug', `serving wildcard ${pattern}`);
  }
  return found ?? { tag: 'not-found' };
}
