'use strict'
// Calls Tasklist through @camunda8/sdk in a loop, as an application would, and prints each
// call's HTTP status on a line of its own, until its stdin closes (tests/clients.rs).
//
//   node loop.js <recipe> <api> <secret folder> <url>
//   recipe: bearer (MountedBearerProvider), headers (MountedSecretHeaders), or once: the
//           control, the BEARER strategy given the mounted token once, at start, with no recipe
//   api:    v1 (Tasklist API: searchTasks) or v2 (Orchestration Cluster API: searchUserTasks)
const fs = require('node:fs')
const path = require('node:path')
const { Camunda8 } = require('@camunda8/sdk')
const { MountedBearerProvider, MountedSecretHeaders, retryOn401 } = require(process.env.RECIPE_JS)

const [recipe, api, dir, url] = process.argv.slice(2)

function provider() {
  switch (recipe) {
    case 'bearer':
      return new MountedBearerProvider(dir)
    case 'headers':
      return new MountedSecretHeaders(dir)
    case 'once':
      return undefined
    default:
      throw new Error(`unknown recipe ${recipe}`)
  }
}

const auth = provider()
const config = {
  CAMUNDA_TASKLIST_BASE_URL: url,
  ZEEBE_REST_ADDRESS: url,
  CAMUNDA_AUTH_STRATEGY: 'BEARER',
  ...(auth ? { oAuthProvider: auth } : { CAMUNDA_OAUTH_TOKEN: fs.readFileSync(path.join(dir, 'token'), 'utf8').trim() }),
}
const c8 = new Camunda8(config)
const call =
  api === 'v1'
    ? () => c8.getTasklistApiClient().searchTasks({ pageSize: 1 })
    : () => c8.getCamundaRestClient().searchUserTasks({ page: { limit: 1 } })

let running = true
process.stdin.on('end', () => (running = false))
process.stdin.resume()

async function main() {
  while (running) {
    let line
    try {
      await (auth ? retryOn401(auth, call) : call())
      line = '200'
    } catch (error) {
      // The status only: the SDK's errors can quote request headers.
      line = error?.response?.statusCode ? String(error.response.statusCode) : `error ${error?.name ?? 'unknown'}`
    }
    process.stdout.write(`${line}\n`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stderr.write(`loop failed: ${error?.name}\n`)
    process.exit(1)
  },
)
