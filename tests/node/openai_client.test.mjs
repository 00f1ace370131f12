// The official OpenAI Node.js client against a real `moepool serve` process on a tiny
// random-weight model: chat (plain and streamed), completions, models, errors.
// Run by ctest through tests/node/run.sh; needs MOEPOOL_BINARY (the moepool executable).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer } from './moepool_server.mjs';

const apiKey = 'node-test-key';
let server;
let client;
let modelId;

before(async () => {
  server = await startServer({
    prefix: 'moepool-node-', apiKey, serveArgs: ['--ctx', '512', '--parallel', '2'],
  });
  modelId = server.modelId;
  client = new OpenAI({ baseURL: `http://127.0.0.1:${server.port}/v1`, apiKey, maxRetries: 0 });
});

after(async () => {
  if (server) await server.stop();
});

const messages = [
  { role: 'system', content: 'You are terse.' },
  { role: 'user', content: 'Name three colours.' },
];

test('lists the model', async () => {
  const models = await client.models.list();
  assert.deepEqual(models.data.map((m) => m.id), [modelId]);
  assert.equal(models.data[0].object, 'model');
});

test('chat completion, then the same streamed', async () => {
  const plain = await client.chat.completions.create({
    model: modelId, messages, max_tokens: 10, temperature: 0,
  });
  assert.equal(plain.object, 'chat.completion');
  assert.equal(plain.choices.length, 1);
  const choice = plain.choices[0];
  assert.equal(choice.message.role, 'assistant');
  assert.equal(typeof choice.message.content, 'string');
  assert.ok(['stop', 'length'].includes(choice.finish_reason));
  assert.ok(plain.usage.prompt_tokens > 0);
  assert.equal(plain.usage.total_tokens, plain.usage.prompt_tokens + plain.usage.completion_tokens);

  const stream = await client.chat.completions.create({
    model: modelId, messages, max_tokens: 10, temperature: 0, stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.content) text += c.delta.content;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.equal(text, choice.message.content);
  assert.equal(finish, choice.finish_reason);
  for (const k of ['prompt_tokens', 'completion_tokens', 'total_tokens']) {
    assert.equal(usage[k], plain.usage[k]);
  }
  // The same conversation again: its prompt's whole 16-token KV blocks came from the prefix
  // cache (the last prompt token is always computed).
  assert.equal(plain.usage.prompt_tokens_details.cached_tokens, 0);
  assert.equal(usage.prompt_tokens_details.cached_tokens,
    Math.floor((plain.usage.prompt_tokens - 1) / 16) * 16);
});

test('legacy completion with logprobs', async () => {
  const r = await client.completions.create({
    model: modelId, prompt: 'The quick brown fox', max_tokens: 6, seed: 3, logprobs: 2,
  });
  assert.equal(r.object, 'text_completion');
  assert.equal(typeof r.choices[0].text, 'string');
  assert.equal(r.usage.completion_tokens, 6);
  assert.equal(r.choices[0].logprobs.tokens.length, 6);
});

test('errors surface as the client\'s error classes', async () => {
  const bad = new OpenAI({ baseURL: client.baseURL, apiKey: 'wrong', maxRetries: 0 });
  await assert.rejects(bad.models.list(), (e) => e instanceof OpenAI.AuthenticationError);
  await assert.rejects(
    client.chat.completions.create({ model: modelId, messages: [{ role: 'user', content: 'x' }], n: 2 }),
    (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === 'n');
});
