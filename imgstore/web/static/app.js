// imgstore serve: small progressive enhancements; every page also works without this script.
"use strict";

(function () {
  // Search: drop, paste or pick an image and the form submits at once.
  const form = document.getElementById("search-form");
  if (form) {
    const input = document.getElementById("image-input");
    const drop = document.getElementById("drop");
    const busy = document.getElementById("busy");
    const submitWith = (files) => {
      if (!files || !files.length) return;
      const image = Array.from(files).find((f) => f.type.startsWith("image/")) || files[0];
      const transfer = new DataTransfer();
      transfer.items.add(image);
      input.files = transfer.files;
      if (busy) busy.hidden = false;
      form.submit();
    };
    input.addEventListener("change", () => { if (input.files.length) { if (busy) busy.hidden = false; form.submit(); } });
    ["dragenter", "dragover"].forEach((name) => document.addEventListener(name, (e) => {
      e.preventDefault(); drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((name) => document.addEventListener(name, (e) => {
      e.preventDefault(); drop.classList.remove("over");
    }));
    document.addEventListener("drop", (e) => submitWith(e.dataTransfer && e.dataTransfer.files));
    document.addEventListener("paste", (e) => {
      const files = e.clipboardData && e.clipboardData.files;
      if (files && files.length) { e.preventDefault(); submitWith(files); }
    });
    form.addEventListener("submit", () => { if (busy) busy.hidden = false; });
  }

  // Collection: follow running background jobs, then show the finished state.
  const running = document.querySelectorAll('.job[data-state="queued"], .job[data-state="running"]');
  running.forEach((row) => {
    const id = row.dataset.job;
    const bar = row.querySelector("progress");
    const state = row.querySelector(".state");
    const tick = async () => {
      let job;
      try {
        const response = await fetch(`/api/jobs/${id}`, { headers: { Accept: "application/json" } });
        if (!response.ok) return;
        job = await response.json();
      } catch (err) {
        setTimeout(tick, 2000);
        return;
      }
      if (job.fraction !== null) bar.value = job.fraction;
      state.textContent = job.state + (job.state === "running" ? ` · ${job.message}` : "");
      row.dataset.state = job.state;
      if (job.state === "done" || job.state === "failed") {
        window.location.reload();
      } else {
        setTimeout(tick, 700);
      }
    };
    setTimeout(tick, 300);
  });

  // Duplicates: follow the search for the groups, then show them (the page the search ends on).
  const search = document.getElementById("dup-search");
  if (search) {
    const bar = search.querySelector("progress");
    const state = search.querySelector(".state");
    const show = () => window.location.replace(search.dataset.next);
    const tick = async () => {
      let job;
      try {
        const response = await fetch(`/api/jobs/${search.dataset.job}`, { headers: { Accept: "application/json" } });
        if (response.status === 404) return show();  // forgotten (an old job): the page starts or shows another
        if (!response.ok) { setTimeout(tick, 2000); return; }
        job = await response.json();
      } catch (err) {
        setTimeout(tick, 2000);
        return;
      }
      if (job.state === "done" || job.state === "failed") return show();
      if (job.fraction === null) bar.removeAttribute("value"); else bar.value = job.fraction;
      state.textContent = job.message;
      setTimeout(tick, 500);
    };
    setTimeout(tick, 300);
  }
})();
