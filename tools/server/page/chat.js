// The chat page: a conversation with the server's /v1/chat/completions, streamed. Plain
// JavaScript, no build step. Model text is put in the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];   // {role, content} as the API takes them
let running = null;        // the AbortController of the reply being streamed
let attached = [];         // data: URLs of the images for the next message (a Vision model's)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function thumbnail(url) {
  const img = document.createElement("img");
  img.src = url;
  img.alt = "attached image";
  return img;
}

function show(role, text, images = []) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  for (const url of images) div.appendChild(thumbnail(url));
  div.appendChild(document.createTextNode(text));
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// The settings filled in; an empty one is left to the server's default.
function settings() {
  const body = {};
  for (const name of ["temperature", "top_p", "min_p", "top_k", "max_tokens", "seed"]) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = ["top_k", "max_tokens", "seed"].includes(name) ? parseInt(value, 10) : parseFloat(value);
  }
  return body;
}

// Server-sent events from a fetch response: each `data:` payload, parsed, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function errorOf(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// The images picked, read as data: URLs (the server fetches nothing: the image travels in the request).
function attach(files) {
  for (const file of files) {
    const reader = new FileReader();
    reader.onload = () => {
      attached.push(reader.result);
      $("attached").appendChild(thumbnail(reader.result));
    };
    reader.readAsDataURL(file);
  }
}

async function send(text) {
  const images = attached;
  attached = [];
  $("attached").textContent = "";
  const content = images.length
    ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  conversation.push({ role: "user", content });
  show("user", text, images);
  const reply = show("assistant", "");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
  running = new AbortController();
  setRunning(true);
  const started = performance.now();
  let first = null, last = null, usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: running.signal,
      body: JSON.stringify({ messages, stream: true, stream_options: { include_usage: true }, ...settings() }),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        last = performance.now();
        if (first === null) first = last;
        reply.textContent += choice.delta.content;
        reply.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") {
      reply.classList.add("stopped");
      finish = "stopped";
    } else {
      reply.classList.add("error");
      reply.textContent += (reply.textContent ? "\n" : "") + `Error: ${e.message}`;
      finish = "error";
    }
  } finally {
    running = null;
    setRunning(false);
  }
  // a turn the server refused or broke off is not sent again with the next one
  if (finish === "error") conversation.pop();
  else conversation.push({ role: "assistant", content: reply.textContent });
  $("stats").textContent = statsLine(started, first, last, usage, finish);
}

function statsLine(started, first, last, usage, finish) {
  const parts = [];
  if (usage) parts.push(`prompt ${usage.prompt_tokens} tokens`, `${usage.completion_tokens} tokens`);
  if (first !== null) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
  if (usage && first !== null && last > first && usage.completion_tokens > 1) {
    parts.push(`${((usage.completion_tokens - 1) / ((last - first) / 1000)).toFixed(1)} tok/s`);
  }
  if (finish) parts.push(finish === "length" ? "stopped at max tokens" : finish);
  return parts.join(" | ");
}

function setRunning(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.ok) $("model").textContent = (await response.json()).data[0].id;
  } catch { /* the page still works; the name is only shown */ }
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value;
    if (!text.trim() || running) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("image").addEventListener("change", (event) => {
    attach(event.target.files);
    event.target.value = "";
  });
  $("new-chat").addEventListener("click", () => {
    if (running) running.abort();
    conversation.length = 0;
    attached = [];
    $("attached").textContent = "";
    $("conversation").textContent = "";
    $("stats").textContent = "";
  });
  $("api_key").addEventListener("change", loadModel);
  loadModel();
});
