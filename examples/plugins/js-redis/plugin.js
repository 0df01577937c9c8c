// A tern certificate plugin in JavaScript, built into a Wasm component with componentize-js.
//
// It does what the shipped Rust Redis plugin does in its default layout: `GET <name>.crt` and `GET <name>.key`
// (one MGET through the host's key-value capability), then the same for `*.<parent>` when the exact name has
// nothing, and an optional TTL key passed on as the cache hint.
//
// Settings (the plugin's `settings` table in tern.toml; all optional):
//   cert_key = "{name}.crt"   key_key = "{name}.key"   ttl_key (unset: no TTL)   wildcard = "true"
//
// WIT to JavaScript, as componentize-js maps it: `select-certificate` is exported as `selectCertificate`; a
// `result` is returned by returning its ok value and failed by throwing; a `variant` is `{ tag, val }`; an
// `option` is the value or `undefined`; `list<u8>` is a Uint8Array.

import { getMany } from 'tern:plugin/kv@0.1.0';
import { get as setting } from 'tern:plugin/config@0.1.0';
import { log } from 'tern:plugin/log@0.1.0';

const utf8 = new TextDecoder('utf-8', { fatal: true });

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

// The certificate stored for `name`, or undefined if its chain or key is missing.
function fetch(name) {
  const fill = (template) => template.replaceAll('{name}', name);
  const keys = [fill(setting('cert_key') ?? '{name}.crt'), fill(setting('key_key') ?? '{name}.key')];
  const ttlKey = setting('ttl_key');
  if (ttlKey !== undefined) keys.push(fill(ttlKey));
  let values;
  try {
    values = getMany(keys);
  } catch (error) {
    throw describe(error);
  }
  const [chain, key, ttl] = values;
  if (chain === undefined || key === undefined) return undefined;
  const certificate = { chain: text(chain, 'certificate', name), privateKey: text(key, 'key', name) };
  if (ttl !== undefined) {
    const raw = text(ttl, 'ttl', name).trim();
    if (!/^[0-9]+$/.test(raw)) throw `ttl of ${name}: expected whole seconds, got ${JSON.stringify(raw)}`;
    certificate.ttlSeconds = Number(raw);
  }
  return certificate;
}

// `*.<parent>` for a name with at least two labels under the wildcard (`*.com` is never valid).
function wildcardOf(name) {
  const dot = name.indexOf('.');
  const parent = name.slice(dot + 1);
  return dot > 0 && parent.includes('.') ? `*.${parent}` : undefined;
}

export function selectCertificate(servername) {
  let found = fetch(servername);
  const pattern = wildcardOf(servername);
  if (found === undefined && (setting('wildcard') ?? 'true') === 'true' && pattern !== undefined) {
    found = fetch(pattern);
    if (found !== undefined) log('debug', `serving wildcard ${pattern}`);
  }
  return found === undefined ? { tag: 'not-found' } : { tag: 'found', val: found };
}
