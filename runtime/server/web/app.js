// speakwatch live camera page: the camera goes to the server as WebRTC video, questions and answers
// travel as OpenAI Realtime events over the "oai-events" data channel of the same call.
// The API key typed into the page stays in memory (never in localStorage): each call first mints a
// single-use client secret with it (POST /v1/realtime/client_secrets) and opens with that secret.
// A lost call is replaced by one that resumes the session (?resume=TOKEN&last_event_id=...): the server
// replays what the page missed, so an answer in progress goes on; a hang-up (DELETE) ends the session.
// No build step, no dependencies: a plain ES module.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const SERVER = (params.get("server") || location.origin).replace(/\/+$/, "");
const KEY_STORAGE = "speakwatch.apiKey"; // where older pages kept the key: removed at start
const SECRET_SECONDS = 60; // a client secret only has to last until its call is made
const VIDEO_IDLE_MS = 8000; // the server ends a track silent for 10 s: after longer pauses, call again
const OPEN_TIMEOUT_MS = 15000;
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 30000;
const CHART_POINTS = 60; // one per second
const STATS_STALE_MS = 2500; // input_video.stats only come while frames move

const ui = {
  status: $("status"),
  statusText: $("status-text"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  retry: $("retry"),
  apiKey: $("api-key"),
  camera: $("camera"),
  cameraState: $("camera-state"),
  cameraToggle: $("camera-toggle"),
  preview: $("preview"),
  sessionId: $("session-id"),
  log: $("log"),
  form: $("ask"),
  question: $("question"),
  send: $("send"),
  cancel: $("cancel"),
  chart: $("chart"),
  fpsIn: $("stats-fps-in"),
  fpsUsed: $("stats-fps-used"),
  frames: $("stats-frames"),
  framesIn: $("stats-frames-in"),
  lag: $("stats-lag"),
  ttft: $("stats-ttft"),
  tps: $("stats-tps"),
};

const conn = {
  state: "connecting",
  seq: 0, // bumps on every (re)connect: handlers of older calls ignore themselves
  pc: null,
  dc: null,
  sender: null,
  callUrl: null,
  videoIdleSince: null, // when the call last had no camera track
  retryDelay: RETRY_FIRST_MS,
  retryTimer: null,
  openTimer: null,
  resume: null, // the session's resume token: a lost call is replaced by one that resumes the session
  lastEventId: null, // the last server event received, so the server replays only what came after it
};
const camera = { stream: null, track: null };
let answer = null; // the answer in progress
let video = null; // the latest input_video.stats, with its arrival time
const samples = [];

// ---------------------------------------------------------------------------------------------
// small helpers

const newEventId = () => `event_${Date.now().toString(36)}${Math.random().toString(36).slice(2, 10)}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function fmt(value, digits = 0) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}

function setNumber(el, value, text) {
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text;
}

function setStatus(state, text) {
  conn.state = state;
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
  document.body.dataset.connection = state;
  updateButtons();
}

function showBanner(text, kind = "info", canRetry = true) {
  ui.bannerText.textContent = text;
  ui.banner.dataset.kind = kind;
  ui.retry.hidden = !canRetry;
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
}

function updateButtons() {
  const open = conn.state === "connected";
  ui.send.disabled = !open || answer !== null;
  ui.cancel.disabled = !open || answer === null || answer.cancelling;
}

function addMessage(kind, text) {
  ui.log.querySelector(".hint")?.remove();
  const el = document.createElement("div");
  el.className = `msg ${kind}`;
  el.textContent = text;
  ui.log.append(el);
  scrollLog();
  return el;
}

function scrollLog() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

// ---------------------------------------------------------------------------------------------
// camera

function setCamera(state, message = "") {
  ui.camera.dataset.camera = state;
  ui.cameraState.textContent = message;
  ui.cameraToggle.textContent = state === "on" || state === "starting" ? "Stop camera" : "Start camera";
  ui.cameraToggle.disabled = state === "starting";
}

async function startCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    setCamera("unavailable", "No camera here: the page needs https:// or localhost for camera access.");
    return;
  }
  setCamera("starting", "Starting camera…");
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15, max: 30 } },
      audio: false,
    });
    camera.stream = stream;
    camera.track = stream.getVideoTracks()[0];
    camera.track.addEventListener("ended", () => {
      if (camera.stream === stream) releaseCamera("off", "The camera stopped (unplugged or taken by another app).");
    });
    ui.preview.srcObject = stream;
    setCamera("on");
    await attachCamera();
  } catch (err) {
    camera.stream = camera.track = null;
    if (err.name === "NotAllowedError" || err.name === "SecurityError") {
      setCamera("denied", "Camera access was denied. Allow it in the browser's site settings, then press Start camera.");
    } else if (err.name === "NotFoundError" || err.name === "OverconstrainedError") {
      setCamera("unavailable", "No camera found. You can still chat.");
    } else {
      setCamera("unavailable", `Camera error: ${err.message || err.name}`);
    }
  }
}

// Put the camera on the running call: swap the track in, unless the server has given up on a silent one.
async function attachCamera() {
  if (!conn.sender) return; // the next call picks the track up
  const idle = conn.videoIdleSince === null ? 0 : performance.now() - conn.videoIdleSince;
  if (conn.state === "connected" && idle > VIDEO_IDLE_MS) {
    addMessage("system", "Camera is back: starting a new session so the server sees the video.");
    newSession();
    return;
  }
  await conn.sender.replaceTrack(camera.track);
  conn.videoIdleSince = null;
}

function releaseCamera(state, message) {
  camera.stream?.getTracks().forEach((track) => track.stop());
  camera.stream = camera.track = null;
  ui.preview.srcObject = null;
  if (conn.sender) {
    conn.sender.replaceTrack(null).catch(() => {});
    conn.videoIdleSince = performance.now();
  }
  setCamera(state, message);
}

ui.cameraToggle.addEventListener("click", () => {
  if (camera.track) releaseCamera("off", "Camera stopped. The model sees nothing new until you start it again.");
  else startCamera();
});

// ---------------------------------------------------------------------------------------------
// connection: one WebRTC call carrying the video and the oai-events data channel

function iceGatheringComplete(pc, timeoutMs = 3000) {
  // The server does not trickle ICE: the offer must carry every candidate.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const finish = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && finish();
    const timer = setTimeout(finish, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

async function connect() {
  clearTimeout(conn.retryTimer);
  teardown(conn.resume !== null);
  const seq = ++conn.seq;
  const mine = () => seq === conn.seq;
  setStatus("connecting", "Connecting…");

  const pc = new RTCPeerConnection({ iceServers: [] });
  const dc = pc.createDataChannel("oai-events"); // before the offer, so the offer negotiates SCTP
  const transceiver = pc.addTransceiver(camera.track || "video", {
    direction: "sendonly",
    streams: camera.stream ? [camera.stream] : [],
  });
  Object.assign(conn, { pc, dc, sender: transceiver.sender, callUrl: null });
  conn.videoIdleSince = camera.track ? null : performance.now();

  dc.addEventListener("open", () => mine() && onOpen());
  dc.addEventListener("close", () => {
    if (!mine()) return;
    conn.callUrl = null; // the server has hung up already
    lost("The server ended the session.");
  });
  dc.addEventListener("message", (event) => mine() && onMessage(event.data));
  pc.addEventListener("connectionstatechange", () => {
    if (mine() && pc.connectionState === "failed") lost("The connection to the server failed.");
  });

  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    if (!mine()) return;
    const minted = await mintSecret();
    if (!mine()) return;
    if (minted.status) {
      refused(minted.status, minted.message);
      return;
    }
    const headers = { "Content-Type": "application/sdp" };
    headers.Authorization = `Bearer ${minted.secret}`;
    const resuming = conn.resume !== null;
    const resume = { resume: conn.resume, ...(conn.lastEventId ? { last_event_id: conn.lastEventId } : {}) };
    const query = resuming ? `?${new URLSearchParams(resume)}` : "";
    const res = await fetch(`${SERVER}/v1/realtime/calls${query}`, {
      method: "POST",
      body: pc.localDescription.sdp,
      headers,
    });
    if (!mine()) return;
    if (resuming && [400, 404, 410].includes(res.status)) {
      // the session is gone (grace period over, server restarted) or cannot be replayed: start anew
      addMessage("system", `The session could not be resumed (${await errorMessage(res)}); starting a new one.`);
      newSession();
      return;
    }
    if (res.status !== 201) {
      refused(res.status, await errorMessage(res));
      return;
    }
    const location = res.headers.get("Location");
    conn.callUrl = location ? new URL(location, `${SERVER}/`).href : null;
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    conn.openTimer = setTimeout(() => {
      if (mine() && dc.readyState !== "open") lost("The server accepted the call but the connection did not open.");
    }, OPEN_TIMEOUT_MS);
  } catch (err) {
    if (mine()) lost(`Cannot reach the server (${err.message || err}).`);
  }
}

// A single-use client secret for one call, minted with the key typed above (or none: a server without
// a key mints without one). {secret} on success, {status, message} when refused.
async function mintSecret() {
  const headers = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const res = await fetch(`${SERVER}/v1/realtime/client_secrets`, {
    method: "POST",
    headers,
    body: JSON.stringify({
      expires_after: { anchor: "created_at", seconds: SECRET_SECONDS },
      session: { type: "realtime" },
    }),
  });
  if (res.status !== 200) return { status: res.status, message: await errorMessage(res) };
  return { secret: (await res.json()).value };
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return body?.error?.message || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

function refused(status, message) {
  teardown();
  if (status === 403) {
    setStatus("error", "Page not allowed");
    showBanner(`The server refuses this page: ${message}.`, "error", true);
  } else if (status === 401) {
    setStatus("error", "API key needed");
    showBanner(`The server refused the API key: ${message}. Enter the key above.`, "error", true);
  } else if (status === 429 || status === 503 || status >= 500) {
    lost(`The server cannot take the session now: ${message}.`);
  } else {
    setStatus("error", "Error");
    showBanner(`The server refused the call: ${message}`, "error", true);
  }
}

function onOpen() {
  clearTimeout(conn.openTimer);
  conn.retryDelay = RETRY_FIRST_MS;
  setStatus("connected", "Live");
  hideBanner();
}

// A new session instead of resuming the current one (the answer in progress, if any, is given up).
function newSession() {
  conn.resume = conn.lastEventId = null;
  if (answer) finishAnswer("failed", "session ended");
  connect();
}

// The call is gone: clean up, say so, and try again with a growing delay. The session waits on the
// server for its grace period: the next call resumes it (the answer in progress goes on).
function lost(reason) {
  if (conn.state === "gone" && conn.retryTimer) return;
  teardown(conn.resume !== null);
  setStatus("gone", "Server gone");
  const delay = conn.retryDelay;
  conn.retryDelay = Math.min(delay * 2, RETRY_MAX_MS);
  const due = performance.now() + delay;
  const tick = () => {
    const left = Math.max(0, Math.ceil((due - performance.now()) / 1000));
    showBanner(`${reason} Reconnecting in ${left} s…`, "error", true);
    conn.retryTimer = left > 0 ? setTimeout(tick, 250) : setTimeout(connect, 0);
  };
  tick();
}

// keep: the session is to be resumed, so neither end the answer nor hang up (which would close it).
function teardown(keep = false) {
  clearTimeout(conn.openTimer);
  if (answer && !keep) finishAnswer("failed", "connection lost");
  const { pc, dc } = conn;
  const callUrl = keep ? null : conn.callUrl;
  Object.assign(conn, { pc: null, dc: null, sender: null, callUrl: null });
  conn.seq++;
  try {
    dc?.close();
    pc?.close();
  } catch {
    // already closed
  }
  if (callUrl) hangUp(callUrl);
  ui.sessionId.textContent = "";
}

function hangUp(callUrl) {
  const headers = {};
  const key = ui.apiKey.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  fetch(callUrl, { method: "DELETE", headers, keepalive: true }).catch(() => {});
}

function sendEvent(event) {
  if (conn.dc?.readyState !== "open") return false;
  conn.dc.send(JSON.stringify(event));
  return true;
}

ui.retry.addEventListener("click", () => {
  conn.retryDelay = RETRY_FIRST_MS;
  connect();
});

// The key lives in the input field only (this page's memory): an older page's stored copy goes.
try {
  localStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem(KEY_STORAGE);
} catch {
  // storage disabled: nothing was stored either
}
$("key-form").addEventListener("submit", (event) => event.preventDefault());
ui.apiKey.addEventListener("change", () => newSession());

window.addEventListener("pagehide", () => {
  if (conn.callUrl) hangUp(conn.callUrl);
});

// ---------------------------------------------------------------------------------------------
// chat

function ask(text) {
  const itemId = newEventId();
  const createId = newEventId();
  const events = [
    {
      type: "conversation.item.create",
      event_id: itemId,
      item: { type: "message", role: "user", content: [{ type: "input_text", text }] },
    },
    { type: "response.create", event_id: createId, response: {} },
  ];
  const sent = sendEvent(events[0]);
  if (!sent) return false;
  sendEvent(events[1]);
  addMessage("user", text);
  document.getElementById("answer")?.removeAttribute("id");
  const el = addMessage("model", "");
  el.dataset.status = "in_progress";
  const textEl = document.createElement("span");
  textEl.className = "text";
  textEl.id = "answer";
  const meta = document.createElement("div");
  meta.className = "meta";
  el.replaceChildren(textEl, meta);
  answer = {
    itemId,
    createId,
    id: null,
    el,
    textEl,
    meta,
    sentAt: performance.now(),
    firstAt: null,
    lastAt: null,
    deltas: 0,
    cancelling: false,
    cancelEvent: null,
    events, // sent again if a resume shows the server never got them (with the cancel, if any)
    error: null,
  };
  updateButtons();
  return true;
}

function cancelAnswer() {
  if (!answer || answer.cancelling) return;
  answer.cancelling = true;
  const event = { type: "response.cancel", event_id: newEventId() };
  if (answer.id) event.response_id = answer.id;
  answer.cancelEvent = event;
  sendEvent(event);
  updateButtons();
}

function finishAnswer(status, detail, usage) {
  const a = answer;
  if (!a) return;
  answer = null;
  const status_ = a.error ? "failed" : status;
  a.el.dataset.status = status_;
  const tokens = usage?.output_tokens ?? a.deltas;
  const ttft = a.firstAt === null ? null : a.firstAt - a.sentAt;
  const span = a.firstAt === null ? 0 : (a.lastAt - a.firstAt) / 1000;
  const tps = tokens > 1 && span > 0 ? (tokens - 1) / span : null;
  const parts = [];
  if (ttft !== null) parts.push(`${fmt(ttft)} ms to first token`);
  if (tps !== null) parts.push(`${fmt(tps, 1)} tokens/s`);
  if (status_ === "cancelled") parts.push("stopped");
  else if (status_ === "incomplete") parts.push(detail === "max_output_tokens" ? "cut at the token limit" : "incomplete");
  else if (status_ !== "completed") parts.push(a.error || detail || status_);
  a.meta.textContent = parts.join(" · ");
  if (ttft !== null) setNumber(ui.ttft, Math.round(ttft), `${fmt(ttft)} ms`);
  if (tps !== null) setNumber(ui.tps, tps.toFixed(1), fmt(tps, 1));
  updateButtons();
  scrollLog();
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.question.value.trim();
  if (!text || answer || conn.state !== "connected") return;
  if (ask(text)) ui.question.value = "";
});

ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.cancel.addEventListener("click", cancelAnswer);

// ---------------------------------------------------------------------------------------------
// server events

function onMessage(data) {
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return;
  }
  if (event.event_id && event.type !== "session.resumed") conn.lastEventId = event.event_id;
  switch (event.type) {
    case "session.created":
      ui.sessionId.textContent = event.session?.id || "";
      conn.resume = event.session?.resume?.token || null;
      break;
    case "session.resumed":
      ui.sessionId.textContent = event.session?.id || "";
      conn.resume = event.session?.resume?.token || null;
      if (event.replayed) addMessage("system", `Reconnected: ${event.replayed} missed events replayed.`);
      resendLost(event.last_client_event_id);
      break;
    case "response.created":
      if (answer && !answer.id) answer.id = event.response?.id || null;
      break;
    case "response.output_text.delta":
      if (answer && (!answer.id || answer.id === event.response_id)) onDelta(event.delta || "");
      break;
    case "response.done":
      if (answer && (!answer.id || answer.id === event.response?.id)) {
        const response = event.response || {};
        const details = response.status_details || {};
        finishAnswer(response.status, details.error?.message || details.reason, response.usage);
      }
      break;
    case "input_video.stats":
      onVideoStats(event);
      break;
    case "error":
      onError(event.error || {});
      break;
    default:
      break;
  }
}

// After a resume: the events of the answer in progress that the server never got go again (the data
// channel is ordered, so the server's last client event tells which).
function resendLost(lastClientEventId) {
  if (!answer) return;
  const lost = [...answer.events, answer.cancelEvent].filter(Boolean);
  const got = lost.findIndex((event) => event.event_id === lastClientEventId);
  // not one of them: the server got none (it is an earlier event's id, or none)
  lost.slice(got + 1).forEach(sendEvent);
}

function onDelta(delta) {
  const now = performance.now();
  if (answer.firstAt === null) {
    answer.firstAt = now;
    const ttft = now - answer.sentAt;
    setNumber(ui.ttft, Math.round(ttft), `${fmt(ttft)} ms`);
  }
  answer.lastAt = now;
  answer.deltas += 1;
  answer.textEl.textContent += delta;
  scrollLog();
}

function onError(error) {
  const text = `${error.code || "error"}: ${error.message || "unknown error"}`;
  if (answer && error.event_id === answer.createId) {
    answer.error = text; // no response was created
    finishAnswer("failed", text);
  } else if (answer && error.event_id === answer.itemId) {
    answer.error = text; // the question was refused: stop the answer response.create started
    cancelAnswer();
  } else {
    addMessage("system error", text);
  }
}

function onVideoStats(event) {
  const at = performance.now();
  video = { ...event, at };
  // the session's SessionStats (runtime/wire.py), under the names the SDKs use
  const received = event.frames_received ?? 0;
  const ingested = event.frames_ingested ?? 0;
  counters.push({ at, received, ingested });
  while (counters.length > 2 && at - counters[0].at > RATE_WINDOW_MS) counters.shift();
  setNumber(ui.frames, ingested, String(ingested));
  ui.framesIn.textContent = `of ${received} in`;
  ui.frames.parentElement.title = `ingested by the model / received by the server; dropped ${event.frames_dropped ?? 0}`;
  const lag = event.frame_lag_p50_ms;
  setNumber(ui.lag, lag, lag === null || lag === undefined ? "–" : `${fmt(lag)} ms`);
  ui.lag.title = `p95 ${fmt(event.frame_lag_p95_ms)} ms`;
}

// ---------------------------------------------------------------------------------------------
// live numbers: rates from the server's counters over a short window (stats come several times a second)

const RATE_WINDOW_MS = 3000;
const counters = []; // {at, received, ingested}

function rate(key) {
  if (counters.length < 2) return null;
  const first = counters[0];
  const last = counters[counters.length - 1];
  const span = (last.at - first.at) / 1000;
  return span > 0.5 ? Math.max(0, (last[key] - first[key]) / span) : null;
}

function sample() {
  const now = performance.now();
  const fresh = video && now - video.at < STATS_STALE_MS;
  if (!fresh) counters.length = 0; // nothing moves: the rates are zero, not the last ones seen
  const fpsIn = fresh ? rate("received") : video ? 0 : null;
  const fpsUsed = fresh ? rate("ingested") : video ? 0 : null;
  setNumber(ui.fpsIn, fpsIn, fmt(fpsIn, 1));
  setNumber(ui.fpsUsed, fpsUsed, fmt(fpsUsed, 1));
  samples.push({ in: fpsIn, used: fpsUsed, lag: fresh ? video.frame_lag_p50_ms ?? null : null });
  if (samples.length > CHART_POINTS) samples.shift();
  drawChart();
}

function niceMax(value, floor) {
  const v = Math.max(value, floor);
  const step = 10 ** Math.floor(Math.log10(v));
  return Math.ceil(v / step) * step;
}

function drawChart() {
  const canvas = ui.chart;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const pad = { l: 8, r: 8, t: 16, b: 6 };
  const fpsMax = niceMax(Math.max(0, ...samples.map((s) => Math.max(s.in ?? 0, s.used ?? 0))), 5);
  const lagMax = niceMax(Math.max(0, ...samples.map((s) => s.lag ?? 0)), 100);

  ctx.strokeStyle = color("--line");
  ctx.lineWidth = 1;
  for (let i = 0; i <= 2; i++) {
    const y = Math.round(pad.t + ((h - pad.t - pad.b) * i) / 2) + 0.5;
    ctx.beginPath();
    ctx.moveTo(pad.l, y);
    ctx.lineTo(w - pad.r, y);
    ctx.stroke();
  }
  ctx.fillStyle = color("--muted");
  ctx.font = "10px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(`${fpsMax} fps`, pad.l, 2);
  ctx.textAlign = "right";
  ctx.fillText(`${lagMax} ms`, w - pad.r, 2);

  const x = (i) => pad.l + ((w - pad.l - pad.r) * (i + CHART_POINTS - samples.length)) / (CHART_POINTS - 1);
  const y = (v, max) => h - pad.b - ((h - pad.t - pad.b) * Math.min(v, max)) / max;
  const line = (key, max, stroke, dash = []) => {
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 2;
    ctx.setLineDash(dash);
    ctx.beginPath();
    let pen = false;
    samples.forEach((s, i) => {
      const v = s[key];
      if (v === null || v === undefined) {
        pen = false;
        return;
      }
      if (pen) ctx.lineTo(x(i), y(v, max));
      else ctx.moveTo(x(i), y(v, max));
      pen = true;
    });
    ctx.stroke();
    ctx.setLineDash([]);
  };
  line("lag", lagMax, color("--lag"), [4, 3]);
  line("in", fpsMax, color("--in"));
  line("used", fpsMax, color("--used"));
}

window.addEventListener("resize", drawChart);
setInterval(sample, 1000);

// ---------------------------------------------------------------------------------------------
// start: camera first (briefly: a permission prompt must not hold up the chat), then the call

setStatus("connecting", "Connecting…");
updateButtons();
drawChart();
const cameraReady = startCamera();
await Promise.race([cameraReady, sleep(3000)]);
connect();
