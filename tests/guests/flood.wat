;; Submits pings forever and never waits for or takes one: must end with limit outstanding.
(module
  (import "pie" "submit" (func $submit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "\82\a2op\a4ping\a7payload\01")
  (func (export "_start")
    (loop $forever
      (drop (call $submit (i32.const 1024) (i32.const 18)))
      (br $forever))))
