#!/usr/bin/env node
// Checks ECS events (one JSON object per line) against the field definitions of the pinned
// @elastic/ecs package (generated/ecs_flat.js, installed by scripts/tools.sh): every field outside
// the custom `egress.*` namespace must be an ECS field, its value of the field's type (arrays
// where ECS normalises to an array), and the categorisation fields (event.kind, event.category,
// event.type, event.outcome) must use allowed values, with each event.type expected by an
// event.category of the event.
//
// usage: check_ecs.js ECS_FLAT_JS FILE...   exit 0: all valid; 1: errors printed; 2: usage
'use strict';
const fs = require('fs');
const net = require('net');

const [flatPath, ...files] = process.argv.slice(2);
if (!flatPath || files.length === 0) {
  console.error('usage: check_ecs.js ECS_FLAT_JS FILE...');
  process.exit(2);
}
const flat = require(require('path').resolve(flatPath)).EcsFlat;
const CUSTOM = 'egress';

function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj)) {
    const name = prefix ? `${prefix}.${k}` : k;
    if (v !== null && typeof v === 'object' && !Array.isArray(v) && !(flat[name] && ['object', 'flattened'].includes(flat[name].type))) {
      flatten(v, name, out);
    } else {
      out.push([name, v]);
    }
  }
  return out;
}

const stringTypes = ['keyword', 'constant_keyword', 'wildcard', 'match_only_text', 'text'];
function typeOk(def, v) {
  const t = def.type;
  if (stringTypes.includes(t)) return typeof v === 'string';
  if (['long', 'integer', 'short', 'byte', 'unsigned_long'].includes(t)) return Number.isInteger(v);
  if (['float', 'double', 'scaled_float', 'half_float'].includes(t)) return typeof v === 'number';
  if (t === 'boolean') return typeof v === 'boolean';
  if (t === 'ip') return typeof v === 'string' && net.isIP(v) !== 0;
  if (t === 'date') return typeof v === 'string' && /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/.test(v) && !isNaN(Date.parse(v));
  if (t === 'object' || t === 'flattened' || t === 'nested') return typeof v === 'object';
  return false;
}

let errors = 0;
let checked = 0;
const fail = (where, msg) => { console.log(`${where}: ${msg}`); errors++; };
for (const file of files) {
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  lines.forEach((line, i) => {
    if (!line.trim()) return;
    const where = `${file}:${i + 1}`;
    const ev = JSON.parse(line);
    for (const [name, value] of flatten(ev, '', [])) {
      if (name === CUSTOM || name.startsWith(CUSTOM + '.')) continue;
      const def = flat[name];
      if (!def) { fail(where, `${name} is not an ECS field`); continue; }
      const isArray = (def.normalize || []).includes('array');
      const values = Array.isArray(value) ? value : [value];
      if (Array.isArray(value) && !isArray) fail(where, `${name} is not an array field`);
      for (const v of values) {
        if (!typeOk(def, v)) fail(where, `${name}: ${JSON.stringify(v)} is not of ECS type ${def.type}`);
        if (def.allowed_values && !def.allowed_values.some((a) => a.name === v)) {
          fail(where, `${name}: ${JSON.stringify(v)} is not an allowed value`);
        }
      }
    }
    if (!ev['@timestamp']) fail(where, '@timestamp is required');
    const cats = (ev.event && ev.event.category) || [];
    const types = (ev.event && ev.event.type) || [];
    const catDefs = flat['event.category'].allowed_values;
    for (const t of types) {
      const expected = cats.some((c) => {
        const d = catDefs.find((a) => a.name === c);
        return d && (d.expected_event_types || []).includes(t);
      });
      if (!expected) fail(where, `event.type ${t} is not expected for event.category ${JSON.stringify(cats)}`);
    }
    checked++;
  });
}
console.log(`${checked} ECS events checked, ${errors} errors`);
process.exit(errors || !checked ? 1 : 0);
