// Drives sdrs serve's web page in headless Chromium: generates a small picture, checks the
// gallery and the "Reuse these settings" button, picks the LoRA the server's folder holds and
// generates with it, and saves a screenshot.
// Usage: node e2e.mjs <base_url> <screenshot_path>
import { chromium } from 'playwright-core';

const [baseUrl, screenshotPath] = process.argv.slice(2);
if (!baseUrl || !screenshotPath) {
  console.error('usage: node e2e.mjs <base_url> <screenshot_path>');
  process.exit(2);
}

const PROMPT = 'a lighthouse at dusk';
// The one LoRA in the server's --lora-dir.
const LORA = 'kohya_locon';

function check(condition, message) {
  if (!condition) throw new Error(message);
}

/** Submits the form and waits for the job's first image; gives the selector of its card. */
async function generate(page) {
  const submitted = page.waitForResponse(
    (response) => response.request().method() === 'POST' && new URL(response.url()).pathname === '/sdrs/v1/jobs',
  );
  await page.click('#generate');
  const response = await submitted;
  check(response.status() === 202, `POST /sdrs/v1/jobs answered ${response.status()}: ${await response.text()}`);
  // The gallery may hold earlier jobs' results; follow this job's.
  const result = `.job[data-job="${(await response.json()).id}"] .result`;
  await page.waitForFunction(
    (selector) => {
      const status = document.querySelector('#status');
      if (status?.classList.contains('error')) throw new Error(`the page reports: ${status.textContent}`);
      const image = document.querySelector(`${selector} .result-image`);
      return image?.complete && image.naturalWidth === 64;
    },
    result,
    { timeout: 120_000, polling: 250 },
  );
  return result;
}

/** The LoRA picker: the folder's LoRA is listed, survives a refresh, and a click puts its tag
 * at the cursor of the prompt box focused last (the negative one, then the prompt). */
async function pickLora(page) {
  const button = page.locator('#loras button', { hasText: LORA });
  await button.waitFor({ timeout: 30_000 });
  const refreshed = page.waitForResponse(
    (response) => response.request().method() === 'POST' && new URL(response.url()).pathname === '/sdapi/v1/refresh-loras',
  );
  await page.click('#refresh_networks');
  const answer = await refreshed;
  check(answer.status() === 200, `POST /sdapi/v1/refresh-loras answered ${answer.status()}: ${await answer.text()}`);
  await button.waitFor({ timeout: 30_000 });

  await page.fill('#negative_prompt', 'blurry');
  await button.click();
  const negative = await page.inputValue('#negative_prompt');
  check(negative === `blurry <lora:${LORA}:1>`, `the negative prompt became ${JSON.stringify(negative)}`);
  await page.fill('#negative_prompt', '');

  await page.fill('#prompt', 'a fox in snow');
  await page.$eval('#prompt', (field) => field.setSelectionRange(5, 5));
  await button.click();
  const prompt = await page.inputValue('#prompt');
  check(prompt === `a fox <lora:${LORA}:1> in snow`, `the prompt became ${JSON.stringify(prompt)}`);
  const negativeAfter = await page.inputValue('#negative_prompt');
  check(negativeAfter === '', `the negative prompt became ${JSON.stringify(negativeAfter)}`);
}

async function run(page) {
  const pageErrors = [];
  page.on('pageerror', (error) => pageErrors.push(error));
  const failIfErrors = () => check(pageErrors.length === 0, `uncaught page error: ${pageErrors[0]}`);

  await page.goto(baseUrl);
  await page.waitForFunction(() => document.querySelectorAll('#sampler option').length > 0, null, { timeout: 30_000 });
  failIfErrors();

  await page.fill('#prompt', PROMPT);
  await page.fill('#width', '64');
  await page.fill('#height', '64');
  await page.fill('#steps', '4');
  await page.fill('#seed', '42');
  const result = await generate(page);

  const infotext = await page.textContent(`${result} .infotext`);
  check(infotext.includes('Seed: 42'), `infotext lacks "Seed: 42": ${infotext}`);
  check(infotext.includes(PROMPT), `infotext lacks the prompt: ${infotext}`);
  check(!infotext.includes('Lora hashes'), `a LoRA in an image without one: ${infotext}`);

  await page.fill('#seed', '-1');
  await page.click(`${result} .reuse`);
  const seed = await page.inputValue('#seed');
  check(seed === '42', `"Reuse these settings" set the seed to ${seed}, not 42`);
  failIfErrors();

  await pickLora(page);
  const withLora = await generate(page);
  const loraInfotext = await page.textContent(`${withLora} .infotext`);
  check(
    new RegExp(`Lora hashes: "${LORA}: [0-9a-f]{12}"`).test(loraInfotext),
    `the infotext lacks the LoRA's hash: ${loraInfotext}`,
  );
  check(loraInfotext.includes(`<lora:${LORA}:1>`), `the infotext lacks the tag: ${loraInfotext}`);

  await page.screenshot({ path: screenshotPath, fullPage: true });
  failIfErrors();
}

let browser;
let failed = false;
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  await run(await browser.newPage());
  console.log('browser e2e: ok');
} catch (error) {
  console.error(`browser e2e: FAILED: ${error.message}`);
  failed = true;
} finally {
  await browser?.close();
}
process.exit(failed ? 1 : 0);
