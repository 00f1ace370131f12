// Structured output through the official OpenAI Node.js client against a real `moepool serve`
// on a tiny random-weight model: response_format json_schema and json_object (chat, plain and
// streamed, and /v1/completions), function tools (tool_choice auto, none, required and named,
// parallel_tool_calls, streamed tool-call deltas, a tool-result round trip), the 400 errors
// for unsupported or invalid schemas and tools, and seeded determinism. The model writes
// gibberish, so only the constraint makes JSON: every reply not cut by max_tokens must parse
// and validate against its schema (checked with ajv).
// Run by ctest through tests/node/run.sh; needs MOEPOOL_BINARY (the moepool executable).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer } from './moepool_server.mjs';
import Ajv from 'ajv';

const apiKey = 'node-test-key';
const ajv = new Ajv({ strict: false });
let server;
let client;
let modelId;

before(async () => {
  server = await startServer({
    prefix: 'moepool-node-so-', apiKey, serveArgs: ['--ctx', '2048', '--parallel', '4'],
  });
  modelId = server.modelId;
  client = new OpenAI({ baseURL: `http://127.0.0.1:${server.port}/v1`, apiKey, maxRetries: 0 });
});

after(async () => {
  if (server) await server.stop();
});

// ---- helpers ---------------------------------------------------------------------------

const ask = [{ role: 'user', content: 'Reply with JSON.' }];
const str = (maxLength, minLength = 0) => ({ type: 'string', minLength, maxLength });
const int = (minimum, maximum) => ({ type: 'integer', minimum, maximum });
const obj = (properties, required = Object.keys(properties)) =>
  ({ type: 'object', properties, required, additionalProperties: false });
const jsonSchema = (name, schema) =>
  ({ type: 'json_schema', json_schema: { name, schema, strict: true } });

// null when `text` is JSON valid for `schema`, else what is wrong with it (and the text).
function jsonProblem(schema, text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    return `not JSON (${e.message}): ${JSON.stringify(text)}`;
  }
  const check = ajv.compile(schema);
  return check(value) ? null : `${ajv.errorsText(check.errors)}: ${text}`;
}

function assertValid(schema, text, what) {
  const problem = jsonProblem(schema, text);
  assert.equal(problem, null, `${what}: ${problem}`);
}

// Runs fn over items, at most `limit` at a time; the results in item order.
async function mapLimit(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

// One chat completion, plain or streamed; streamed deltas are put back together.
// Returns { content, finish, toolCalls } (toolCalls undefined when there are none).
async function chat(params) {
  const r = await client.chat.completions.create({ model: modelId, messages: ask, ...params });
  if (!params.stream) {
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices.length, 1);
    const { message, finish_reason: finish } = r.choices[0];
    assert.equal(message.role, 'assistant');
    const toolCalls = message.tool_calls?.length ? message.tool_calls : undefined;
    return { content: message.content, finish, toolCalls };
  }
  let content = '';
  let finish = null;
  const calls = [];
  for await (const chunk of r) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    for (const c of chunk.choices) {
      if (c.delta.content) content += c.delta.content;
      for (const d of c.delta.tool_calls ?? []) {
        assert.equal(typeof d.index, 'number', 'a tool_calls delta has an index');
        if (!calls[d.index]) {
          assert.equal(typeof d.id, 'string', 'the first delta of a tool call carries its id');
          assert.equal(d.type, 'function', 'the first delta of a tool call carries its type');
          assert.equal(typeof d.function?.name, 'string', 'the first delta carries the name');
          calls[d.index] = { id: d.id, type: 'function',
                             function: { name: d.function.name, arguments: '' } };
        } else if (d.function?.name) {
          assert.equal(d.function.name, calls[d.index].function.name);
        }
        if (d.function?.arguments) calls[d.index].function.arguments += d.function.arguments;
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.ok(!calls.includes(undefined), 'streamed tool call indices run 0, 1, ...');
  return { content, finish, toolCalls: calls.length ? calls : undefined };
}

// Every call names one of `tools` and its arguments validate against that tool's parameters.
function assertToolCalls(calls, tools, what) {
  assert.ok(Array.isArray(calls) && calls.length > 0, `${what}: tool_calls is a non-empty array`);
  for (const call of calls) {
    assert.equal(typeof call.id, 'string', `${what}: call id`);
    assert.ok(call.id.length > 0, `${what}: call id is not empty`);
    assert.equal(call.type, 'function', `${what}: call type`);
    const tool = tools.find((t) => t.function.name === call.function.name);
    assert.ok(tool, `${what}: call names an unknown function ${call.function.name}`);
    assertValid(tool.function.parameters, call.function.arguments,
                `${what}: ${call.function.name} arguments`);
  }
  assert.equal(new Set(calls.map((c) => c.id)).size, calls.length, `${what}: call ids are unique`);
}

// The request fails with HTTP 400 in OpenAI's error shape, naming `param` when one is given.
async function expect400(promise, param, what) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError, `${what}: expected a 400, got ${e}`);
    assert.equal(e.status, 400, what);
    assert.equal(e.type, 'invalid_request_error', what);
    assert.equal(typeof e.error?.message, 'string', what);
    // A param given as a prefix ('messages') also matches a more precise 'messages[1]...'.
    if (param !== undefined) {
      assert.ok(e.param === param || e.param?.startsWith(`${param}[`), `${what}: ${e.param}`);
    }
    return true;
  }, `${what}: expected a 400`);
}

// ---- the schema table ------------------------------------------------------------------
// Every string is bounded (maxLength <= 12) and every array (maxItems <= 4), so a constrained
// reply always fits well within max_tokens 400.

const point = obj({ x: int(-9, 9), y: int(-9, 9) });
const schemas = [
  ['flat', obj({ name: str(12), age: int(0, 120), active: { type: 'boolean' } })],
  ['optional_fields', obj({ id: int(1, 99), nick: str(8), note: str(10) }, ['id'])],
  ['all_optional', obj({ a: { type: 'boolean' }, b: str(5) }, [])],
  ['empty_object', obj({})],
  ['nested', obj({ user: obj({ name: str(10), address: obj({ city: str(12), zip: str(5, 5) }) }),
                   ok: { type: 'boolean' } })],
  ['array_of_objects', obj({ items: { type: 'array', maxItems: 3,
                                      items: obj({ sku: str(6), qty: int(1, 9) }) } })],
  ['string_enum', obj({ color: { enum: ['red', 'green', 'blue'] },
                        size: { enum: ['s', 'm', 'l'] } })],
  ['mixed_enum', obj({ v: { enum: ['on', 1, true, null] } })],
  ['escaped_enum', obj({ s: { enum: ['plain', 'two words', 'quo"te', 'back\\slash',
                                     'caf\u00e9'] } })],
  ['null_unions', obj({ title: { type: ['string', 'null'], maxLength: 12 },
                        count: { type: ['integer', 'null'], minimum: 0, maximum: 50 } })],
  ['int_bounds', obj({ neg: int(-100, -10), small: int(0, 3), one: int(7, 7) })],
  ['int_exclusive', obj({ e: { type: 'integer', exclusiveMinimum: -5, exclusiveMaximum: 5 },
                          lo: { type: 'integer', minimum: 1000 },
                          hi: { type: 'integer', maximum: -3 } })],
  ['number_and_int', obj({ price: { type: 'number' }, units: { type: 'integer' } })],
  ['const_fields', obj({ version: { const: 'v1' }, kind: { const: 42 }, body: str(8) })],
  ['defs_ref', { $defs: { point },
                 ...obj({ from: { $ref: '#/$defs/point' }, to: { $ref: '#/$defs/point' } }) }],
  ['defs_chain', { $defs: { tag: str(6),
                            tagged: obj({ tag: { $ref: '#/$defs/tag' }, n: int(0, 9) }) },
                   ...obj({ list: { type: 'array', maxItems: 3,
                                    items: { $ref: '#/$defs/tagged' } } }) }],
  ['anyof_shapes', obj({ shape: { anyOf: [obj({ kind: { const: 'circle' }, r: int(1, 50) }),
                                          obj({ kind: { const: 'rect' }, w: int(1, 50),
                                                h: int(1, 50) })] } })],
  ['anyof_scalars', obj({ id: { anyOf: [int(0, 999), str(6, 1)] } })],
  ['top_array', { type: 'array', items: int(0, 9), minItems: 1, maxItems: 4 }],
  ['top_enum', { enum: ['yes', 'no', 'maybe'] }],
  ['top_anyof', { anyOf: [{ type: 'boolean' }, { type: 'null' }, int(0, 5)] }],
  ['booleans', obj({ a: { type: 'boolean' }, b: { type: 'boolean' }, c: { type: 'null' } })],
  ['fixed_arrays', obj({ pair: { type: 'array', items: str(4), minItems: 2, maxItems: 2 },
                         flags: { type: 'array', items: { type: 'boolean' }, maxItems: 4 } })],
  ['string_lengths', obj({ code: str(4, 4), word: str(12, 3), empty: str(0) })],
  ['matrix', { type: 'array', maxItems: 3,
               items: { type: 'array', maxItems: 3, items: int(-1, 1) } }],
];

test('json_schema: chat replies validate, and the constraint makes them end', async (t) => {
  const jobs = schemas.flatMap(([name, schema], i) =>
    [false, true].map((stream) => ({ name, schema, stream, seed: stream ? 100 + i : i })));
  const results = await mapLimit(jobs, 4, async ({ name, schema, stream, seed }) => {
    const r = await chat({ max_tokens: 400, temperature: 1, seed, stream,
                           response_format: jsonSchema(name, schema) });
    const what = `${name} (${stream ? 'streamed' : 'plain'}, seed ${seed})`;
    assert.equal(typeof r.content, 'string', `${what}: content is a string`);
    assert.equal(r.toolCalls, undefined, `${what}: no tool calls`);
    assert.ok(['stop', 'length'].includes(r.finish), `${what}: finish_reason ${r.finish}`);
    const problem = r.finish === 'stop' ? jsonProblem(schema, r.content) : null;
    return { what, finish: r.finish, problem };
  });
  const stops = results.filter((r) => r.finish === 'stop').length;
  t.diagnostic(`${stops} of ${results.length} replies finished with "stop"`);
  assert.deepEqual(results.filter((r) => r.problem).map((r) => `${r.what}: ${r.problem}`), []);
  assert.ok(stops >= 0.8 * results.length,
            `only ${stops} of ${results.length} finished with "stop"; cut: ` +
            results.filter((r) => r.finish !== 'stop').map((r) => r.what).join(', '));
});

test('json_object: replies are JSON objects', async () => {
  await Promise.all([false, false, true].map(async (stream, i) => {
    const r = await chat({ max_tokens: 300, temperature: 1, seed: 40 + i, stream,
                           response_format: { type: 'json_object' } });
    assert.ok(['stop', 'length'].includes(r.finish), `finish_reason ${r.finish}`);
    if (r.finish !== 'stop') return;
    let value;
    assert.doesNotThrow(() => { value = JSON.parse(r.content); }, `not JSON: ${r.content}`);
    assert.ok(value !== null && typeof value === 'object' && !Array.isArray(value),
              `not a JSON object: ${r.content}`);
  }));
});

test('completions accept response_format json_schema', async () => {
  const schema = obj({ answer: str(12), score: int(0, 10),
                       tags: { type: 'array', items: str(5), maxItems: 3 } });
  const r = await client.completions.create({
    model: modelId, prompt: 'Answer in JSON:', max_tokens: 400, temperature: 1, seed: 7,
    response_format: jsonSchema('answer', schema),
  });
  assert.equal(r.object, 'text_completion');
  const c = r.choices[0];
  assert.ok(['stop', 'length'].includes(c.finish_reason), `finish_reason ${c.finish_reason}`);
  if (c.finish_reason === 'stop') assertValid(schema, c.text, 'completion');
});

test('the same seed gives the same constrained reply', async () => {
  const [name, schema] = schemas.find(([n]) => n === 'array_of_objects');
  const params = { max_tokens: 400, temperature: 1, seed: 1234,
                   response_format: jsonSchema(name, schema) };
  const a = await chat(params);
  const b = await chat(params);
  assert.equal(b.content, a.content);
  assert.equal(b.finish, a.finish);
});

// ---- tools -----------------------------------------------------------------------------

const fn = (name, description, parameters) =>
  ({ type: 'function', function: { name, description, parameters } });
const getWeather = fn('get_weather', 'Current weather in a city.',
                      obj({ city: str(12, 1), unit: { enum: ['c', 'f'] } }));
const add = fn('add', 'Adds two integers.',
               obj({ a: { type: 'integer' }, b: { type: 'integer' } }));
const createEvent = fn('create_event', 'Puts an event in the calendar.', obj({
  title: str(12, 1),
  when: obj({ day: int(1, 31), month: { enum: ['jan', 'feb', 'mar'] }, hour: int(0, 23) },
            ['day', 'month']),
  guests: { type: 'array', maxItems: 3,
            items: obj({ name: str(10), vip: { type: 'boolean' } }, ['name']) },
}, ['title', 'when']));
const toolSets = [[getWeather], [getWeather, add], [add, createEvent, getWeather]];
const named = (name) => ({ type: 'function', function: { name } });

test('tool_choice required or named: the reply is valid tool calls', async (t) => {
  const jobs = [];
  for (const tools of toolSets) {
    const last = tools[tools.length - 1].function.name;
    for (const stream of [false, true]) {
      jobs.push({ tools, stream, tool_choice: 'required', one: false });
      jobs.push({ tools, stream, tool_choice: 'required', parallel_tool_calls: false, one: true });
      jobs.push({ tools, stream, tool_choice: named(last), name: last, one: true });
    }
  }
  const finishes = await mapLimit(jobs, 4, async (job, i) => {
    const { tools, stream, tool_choice, parallel_tool_calls, one, name } = job;
    const r = await chat({ tools, tool_choice, parallel_tool_calls, stream, max_tokens: 1000,
                           temperature: 1, seed: 200 + i });
    const what = `tools [${tools.map((x) => x.function.name)}], ` +
                 `tool_choice ${JSON.stringify(tool_choice)}` +
                 `${parallel_tool_calls === false ? ', no parallel calls' : ''}, ` +
                 `${stream ? 'streamed' : 'plain'}`;
    assert.ok(['tool_calls', 'length'].includes(r.finish), `${what}: finish_reason ${r.finish}`);
    if (r.finish === 'length') return r.finish;
    assert.equal(r.content, stream ? '' : null, `${what}: no content beside the tool calls`);
    assertToolCalls(r.toolCalls, tools, what);
    if (one) assert.equal(r.toolCalls.length, 1, `${what}: exactly one call`);
    if (name) assert.equal(r.toolCalls[0].function.name, name, `${what}: the named function`);
    return r.finish;
  });
  const done = finishes.filter((f) => f === 'tool_calls').length;
  t.diagnostic(`${done} of ${finishes.length} tool replies finished with "tool_calls"`);
  assert.ok(done >= 0.8 * finishes.length,
            `only ${done} of ${finishes.length} finished with "tool_calls"`);
});

test('tool_choice auto and none', async () => {
  const jobs = toolSets.flatMap((tools) => ['auto', 'none'].flatMap((tool_choice) =>
    [false, true].map((stream) => ({ tools, tool_choice, stream }))));
  await mapLimit(jobs, 4, async ({ tools, tool_choice, stream }, i) => {
    const r = await chat({ tools, tool_choice, stream, max_tokens: 40, temperature: 1,
                           seed: 300 + i });
    const what = `tool_choice ${tool_choice}, ${stream ? 'streamed' : 'plain'}`;
    if (tool_choice === 'none') assert.equal(r.toolCalls, undefined, `${what}: no tool calls`);
    if (r.toolCalls) {
      assert.ok(['tool_calls', 'length'].includes(r.finish), `${what}: finish_reason ${r.finish}`);
      if (r.finish === 'tool_calls') assertToolCalls(r.toolCalls, tools, what);
    } else {
      assert.equal(typeof r.content, 'string', `${what}: content is a string`);
      assert.ok(['stop', 'length'].includes(r.finish), `${what}: finish_reason ${r.finish}`);
    }
  });
});

test('a tool result goes back into the conversation', async () => {
  const tools = toolSets[1];
  const first = await client.chat.completions.create({
    model: modelId, messages: ask, tools, tool_choice: 'required', parallel_tool_calls: false,
    max_tokens: 400, temperature: 1, seed: 60,
  });
  const { message, finish_reason } = first.choices[0];
  assert.equal(finish_reason, 'tool_calls');
  assertToolCalls(message.tool_calls, tools, 'first reply');
  const calls = message.tool_calls.map(({ id, type, function: f }) =>
    ({ id, type, function: { name: f.name, arguments: f.arguments } }));
  const messages = [
    ...ask,
    { role: 'assistant', content: null, tool_calls: calls },
    ...calls.map((c) => ({ role: 'tool', tool_call_id: c.id,
                           content: JSON.stringify({ ok: true, value: 21 }) })),
  ];
  const second = await client.chat.completions.create({
    model: modelId, messages, tools, tool_choice: 'auto', max_tokens: 30, temperature: 1, seed: 61,
  });
  assert.equal(second.object, 'chat.completion');
  assert.ok(['stop', 'length', 'tool_calls'].includes(second.choices[0].finish_reason));
  assert.ok(second.usage.prompt_tokens > first.usage.prompt_tokens,
            'the tool call and its result are in the prompt');
});

// ---- bad input -------------------------------------------------------------------------

const badSchemas = [
  ['pattern', obj({ s: { type: 'string', pattern: '^a+$', maxLength: 5 } })],
  ['format', { type: 'string', format: 'date-time' }],
  ['oneOf', { oneOf: [{ type: 'integer' }, { type: 'boolean' }] }],
  ['recursive $ref', { $defs: { node: obj({ v: int(0, 9), next: { $ref: '#/$defs/node' } },
                                          ['v']) },
                       ...obj({ root: { $ref: '#/$defs/node' } }) }],
  ['minimum on a number', obj({ x: { type: 'number', minimum: 0 } })],
  ['uniqueItems', { type: 'array', items: int(0, 9), maxItems: 3, uniqueItems: true }],
  ['unknown type', { type: 'strin' }],
  ['required property not in properties', { type: 'object', required: ['x'], properties: {} }],
  ['minLength above maxLength', { type: 'string', minLength: 5, maxLength: 2 }],
  ['$ref to a missing definition', obj({ a: { $ref: '#/$defs/nope' } })],
];

test('unsupported or invalid schemas are 400 errors on response_format', async () => {
  for (const [name, schema] of badSchemas) {
    await expect400(chat({ max_tokens: 5, response_format: jsonSchema('bad', schema) }),
                    'response_format', name);
  }
  await expect400(client.completions.create({
    model: modelId, prompt: 'Answer in JSON:', max_tokens: 5,
    response_format: jsonSchema('bad', badSchemas[0][1]),
  }), 'response_format', 'completions with a pattern');
  const r = await chat({ max_tokens: 400, seed: 1,
                         response_format: jsonSchema('ok', schemas[0][1]) });
  assert.ok(['stop', 'length'].includes(r.finish), 'the server still answers');
});

test('bad tools and tool_choice are 400 errors', async () => {
  const history = [...ask,
    { role: 'assistant', content: null,
      tool_calls: [{ id: 'call_1', type: 'function',
                     function: { name: 'nope', arguments: '{}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: '{}' }];
  const cases = [
    ['tool_choice names a function not in tools',
     { tools: [getWeather], tool_choice: named('nope') }, 'tool_choice'],
    ['tool_choice required without tools', { tool_choice: 'required' }],
    ['unsupported parameters schema',
     { tools: [fn('f', 'x', obj({ s: { type: 'string', pattern: 'x' } }))] }, 'tools'],
    ['a tool without a name', { tools: [{ type: 'function', function: { parameters: obj({}) } }] }],
    ['two tools with the same name', { tools: [getWeather, getWeather] }],
    ['the history calls an unknown function',
     { tools: [getWeather], messages: history }, 'messages'],
  ];
  for (const [name, params, param] of cases) {
    await expect400(chat({ max_tokens: 5, ...params }), param, name);
  }
  const r = await chat({ max_tokens: 400, seed: 2, tools: [getWeather], tool_choice: 'required' });
  assert.ok(['tool_calls', 'length'].includes(r.finish), 'the server still answers');
});
